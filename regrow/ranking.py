"""The lowest ``k`` scores of many tensors together, found exactly in bounded memory.

Global pruning ranks every target weight together. Concatenating the scores and sorting them costs the
scores (4 bytes a weight), a sorted copy (4) and int64 indices (8): with ``torch.nn.utils.prune`` that is 14x
a float32 model, and a 1 B-parameter model needs 8 GB of indices alone. Here the k-th lowest score is found by
a radix select on the bits of its float32 value: a 65,536-bucket histogram of the top 16 bits of every score,
then one of the low 16 bits of the scores in the bucket that holds the k-th; a last pass writes the keep-masks.
Each pass reads one tensor at a time, chunk by chunk, so the memory needed is the masks (1 byte a weight)
and one chunk's temporaries, whatever the number of weights.

The masks are exactly those of a stable sort of the concatenated float32 scores: the ``k`` lowest go, and
among equal scores the one that comes first (earlier tensor, then row-major order) goes first. ``-0.0``
counts as ``0.0``; NaN ranks above ``+inf``, as ``torch.sort`` puts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from regrow.criteria.base import score_chunks, score_like

CHUNK = 1 << 20  # scores read at a time: 1 Mi elements, 4 MiB of float32
_NAN = 0x7FC00000  # the key of every NaN: above +inf (0x7F800000)
_BUCKETS = 1 << 16


def sortable_keys(scores: Tensor) -> Tensor:
    """int32 keys ordered as the float32 values of ``scores`` (flattened): for floats ``a < b`` exactly when
    ``key(a) < key(b)``, and equal floats have equal keys."""
    x = scores.reshape(-1).float() + 0.0  # a copy, and -0.0 + 0.0 is +0.0
    bits = x.view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the order of their magnitude bits
    return keys.masked_fill_(torch.isnan(x), _NAN)


def _chunks(scores: Mapping[str, Tensor], names: Sequence[str]) -> Iterator[Tensor]:
    """The keys of consecutive chunks of every tensor, in order."""
    for name in names:
        for chunk in score_chunks(scores, name, CHUNK):
            yield sortable_keys(chunk)


def count(scores: Mapping[str, Tensor], name: str, test: Callable[[Tensor], Tensor]) -> int:
    """How many of ``scores[name]`` pass ``test`` (an element-wise predicate, e.g. ``torch.isneginf``), counted
    chunk by chunk (``tensor.sum()`` of a bool tensor would make an int64 copy of it)."""
    return sum(int(torch.count_nonzero(test(chunk))) for chunk in score_chunks(scores, name, CHUNK))


def _first_reaching(hist: Tensor, needed: int) -> tuple[int, int]:
    """The first bucket at which the running count reaches ``needed``, and the count before it."""
    cum = hist.cumsum(0)
    bucket = int(torch.searchsorted(cum, torch.tensor([needed], device=cum.device, dtype=cum.dtype)).item())
    return bucket, int(cum[bucket - 1]) if bucket else 0


def kth_key(scores: Mapping[str, Tensor], names: Sequence[str], k: int) -> tuple[int, int] | None:
    """The key (``sortable_keys``) of the ``k``-th lowest score over ``names`` (``k`` >= 1, counted from 1; past
    the last score: the last) and how many scores are strictly below it; None when there are no scores."""
    high = None
    for keys in _chunks(scores, names):
        counts = torch.bincount((keys >> 16) + (_BUCKETS // 2), minlength=_BUCKETS)
        high = counts if high is None else high.add_(counts)
    if high is None or not int(high.sum()):
        return None
    k = min(k, int(high.sum()))
    bucket, below = _first_reaching(high, k)
    top = bucket - _BUCKETS // 2
    low = None
    for keys in _chunks(scores, names):
        inside = keys[(keys >> 16) == top] & 0xFFFF
        counts = torch.bincount(inside, minlength=_BUCKETS)
        low = counts if low is None else low.add_(counts)
    assert low is not None
    bottom, below_in_bucket = _first_reaching(low, k - below)
    return (top << 16) | bottom, below + below_in_bucket


def lowest_masks(scores: Mapping[str, Tensor], names: Sequence[str], k: int) -> dict[str, Tensor]:
    """Keep-masks (True = keep) that drop the ``k`` lowest of ``scores[name]`` for ``names`` taken together.

    The scores are read three times (once when ``k`` is 0), a chunk at a time; lazy scores
    (``regrow.criteria.LazyScores``) are computed chunk by chunk, so no tensor's scores exist whole.
    """
    found = kth_key(scores, names, k) if k > 0 else None
    key, ties = (None, 0) if found is None else (found[0], k - found[1])  # ties: the equal ones that go first
    out = {}
    for name in names:
        like = score_like(scores, name)
        mask = out[name] = torch.ones(like.shape, dtype=torch.bool, device=like.device)
        if key is None:
            continue
        kept, start = mask.view(-1), 0
        for chunk in score_chunks(scores, name, CHUNK):
            keys = sortable_keys(chunk)
            keep = keys > key
            if ties > 0:
                equal = torch.nonzero(keys == key).reshape(-1)
                keep[equal[ties:]] = True
                ties -= min(ties, equal.numel())
            else:
                keep |= keys == key
            kept[start : start + keep.numel()] = keep
            start += keep.numel()
    return out
