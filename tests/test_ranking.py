"""regrow.ranking: the lowest k over many tensors, exactly as a stable sort of their concatenation."""

from __future__ import annotations

import pytest
import torch

from regrow import ranking
from regrow.criteria.base import LazyScores
from regrow.ranking import lowest_masks, sortable_keys

T, F = True, False


def by_sort(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    out, start = [], 0
    for t in tensors:
        out.append(keep[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def test_keys_order_as_the_floats():
    values = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf"), float("nan")])
    keys = sortable_keys(values).tolist()
    assert keys[3] == keys[4]  # -0.0 and 0.0 are one value
    assert keys[:4] == sorted(keys[:4]) and len(set(keys[:4])) == 4
    assert keys[4:] == sorted(keys[4:]) and len(set(keys[4:])) == 5


def test_ties_go_in_order_across_tensors():
    a, b = torch.tensor([2.0, 1.0, 1.0]), torch.tensor([[1.0, 0.5], [1.0, 3.0]])
    out = lowest_masks({"a": a, "b": b}, ["a", "b"], 3)
    # 0.5 first, then the first two of the four 1.0s in order: a[1], a[2]
    assert out["a"].tolist() == [T, F, F]
    assert out["b"].tolist() == [[T, F], [T, T]]
    out = lowest_masks({"a": a, "b": b}, ["b", "a"], 3)  # the order of names is the order of ties
    assert out["b"].tolist() == [[F, F], [F, T]]
    assert out["a"].tolist() == [T, T, T]


def test_zero_and_more_than_all():
    a = torch.tensor([3.0, 1.0])
    assert lowest_masks({"a": a}, ["a"], 0)["a"].tolist() == [T, T]
    assert lowest_masks({"a": a}, ["a"], 5)["a"].tolist() == [F, F]
    assert lowest_masks({"a": torch.zeros(0)}, ["a"], 1)["a"].tolist() == []
    assert lowest_masks({}, [], 1) == {}


@pytest.mark.parametrize("seed", range(4))
def test_matches_a_stable_sort_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch, seed: int):
    monkeypatch.setattr(ranking, "CHUNK", 7)  # tensors span several chunks, ties fall across chunk edges
    gen = torch.Generator().manual_seed(seed)
    for trial in range(60):
        shapes = [tuple(int(v) for v in torch.randint(1, 7, (2,), generator=gen)) for _ in range(3)]
        if trial % 2:  # few distinct values: many ties
            tensors = [torch.randint(-3, 4, s, generator=gen).float() for s in shapes]
        else:
            tensors = [torch.randn(s, generator=gen) for s in shapes]
        tensors[0].view(-1)[0] = float("-inf")
        tensors[-1].view(-1)[-1] = -0.0
        total = sum(t.numel() for t in tensors)
        k = int(torch.randint(0, total + 2, (1,), generator=gen))
        names = ["x", "y", "z"]
        got = lowest_masks(dict(zip(names, tensors, strict=True)), names, k)
        for name, expected in zip(names, by_sort(tensors, k), strict=True):
            assert torch.equal(got[name], expected), (trial, k)


def test_lazy_scores_are_computed_when_read():
    w = torch.tensor([1.0, -2.0])
    calls = []
    lazy = LazyScores(["w"], lambda f: calls.append(f) or w, torch.abs)
    assert list(lazy) == ["w"] and len(lazy) == 1 and calls == []
    assert lazy["w"].tolist() == [1.0, 2.0] and calls == ["w"]
    w.mul_(3)
    assert lazy.map(lambda f, s: -s)["w"].tolist() == [-3.0, -6.0]
    with pytest.raises(KeyError):
        lazy["v"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_ranking_on_cuda_is_the_cpus():
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(300, 70, generator=gen) for n in "abc"}
    tensors["b"][:5] = 0.25  # ties across a tensor
    for k in (0, 1, 20_000, 63_000, 63_001):
        cpu = lowest_masks(tensors, list(tensors), k)
        gpu = lowest_masks({n: t.cuda() for n, t in tensors.items()}, list(tensors), k)
        assert all(gpu[n].is_cuda and torch.equal(gpu[n].cpu(), cpu[n]) for n in tensors), k
