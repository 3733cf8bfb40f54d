"""Exact, hand-computed masks. Tie rule: among equal scores the earlier element (row-major) goes first."""

import warnings

import pytest
import torch

from regrow.errors import RegrowError
from regrow.patterns import NM, Unstructured, get_pattern

T, F = True, False


def masks(pattern, scores, **kw):
    kw.setdefault("sparsity", None)
    kw.setdefault("threshold", None)
    kw.setdefault("scope", "global")
    return pattern.make_masks(scores, **kw)


def test_unstructured_layer_scope():
    s = {"w": torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.0, 0.4]])}
    out = masks(Unstructured(), s, sparsity=0.5, scope="layer")
    assert out["w"].tolist() == [[F, T, T], [F, F, T]]


def test_global_scope_ranks_all_targets_together():
    s = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0])}
    glob = masks(Unstructured(), s, sparsity=0.5, scope="global")
    assert glob["a"].tolist() == [F, F, F, T]
    assert glob["b"].tolist() == [T, T]
    layer = masks(Unstructured(), s, sparsity=0.5, scope="layer")
    assert layer["a"].tolist() == [F, F, T, T]
    assert layer["b"].tolist() == [F, T]


def test_global_scope_warns_when_it_empties_a_target():
    s = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.1, 0.2])}
    with pytest.warns(UserWarning, match=r"removed every weight of 'b'"):
        out = masks(Unstructured(), s, sparsity=0.5, scope="global")
    assert out["a"].tolist() == [F, T, T, T] and out["b"].tolist() == [F, F]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every target keeps a weight: no warning
        masks(Unstructured(), {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, 3.0])}, sparsity=0.5)


def test_a_capped_global_ranking_pins_the_target_it_would_empty_and_ranks_the_rest_again():
    s = {"a": torch.tensor([10.0, 11.0, 12.0, 13.0]), "b": torch.arange(1.0, 9.0)}
    # 9 of 12 go: uncapped, all 8 of b and a's lowest
    with pytest.warns(UserWarning, match="removed every weight of 'b'"):
        plain = masks(Unstructured(), s, sparsity=0.75)
    assert plain["b"].tolist() == [F] * 8 and plain["a"].tolist() == [F, T, T, T]
    # cap 0.875 (PruneSpec's default at 0.75: 1 - 0.5 * 0.25): b loses at most 7, a the other 2
    capped = masks(Unstructured(), s, sparsity=0.75, cap=0.875)
    assert capped["b"].tolist() == [F] * 7 + [T] and capped["a"].tolist() == [F, F, T, T]
    # a cap that binds twice: c is pinned in the second round, after b's pin moved the budget onto it
    s3 = {
        "a": torch.tensor([10.0, 11.0, 12.0, 13.0]),
        "b": torch.arange(1.0, 5.0),
        "c": torch.tensor([5.0, 6.0, 7.0, 8.0]),
    }
    out = masks(Unstructured(), s3, sparsity=0.5, cap=0.5)
    assert [out[k].tolist() for k in "abc"] == [[F, F, T, T], [F, F, T, T], [F, F, T, T]]


def test_a_capped_global_ranking_removes_exactly_the_budget():
    from regrow.patterns import pruned_count

    torch.manual_seed(0)
    scores = {"a": torch.rand(370) * 0.1, "b": torch.rand(530), "c": torch.rand(1010) * 10}  # a would go first
    for sparsity, cap in ((0.995, 0.995), (0.6, 0.6), (0.9, 0.95), (0.5, 0.99)):
        out = masks(Unstructured(), scores, sparsity=sparsity, cap=cap)
        assert sum(int((~m).sum()) for m in out.values()) == pruned_count(sparsity, 1910), (sparsity, cap)
        assert all(int((~out[f]).sum()) <= pruned_count(cap, scores[f].numel()) for f in scores)
    # every target keeps a weight: three targets of 4 cannot lose 11 of 12 together
    tiny = {"a": torch.rand(4), "b": torch.rand(4), "c": torch.rand(4)}
    assert sum(int((~m).sum()) for m in masks(Unstructured(), tiny, sparsity=0.99, cap=0.99).values()) == 9
    # weights pruned before (a gradual schedule's: score -inf) stay pruned even past a lower cap, and count
    before = {"a": torch.tensor([float("-inf")] * 3 + [1.0]), "b": torch.tensor([2.0, 3.0, 4.0, 5.0])}
    out = masks(Unstructured(), before, sparsity=0.5, cap=0.5)
    assert out["a"].tolist() == [F, F, F, T] and out["b"].tolist() == [F, T, T, T]


def test_the_default_global_cap_follows_the_overall_density():
    from regrow.spec import PruneSpec

    spec = lambda s, **kw: PruneSpec("unstructured", "magnitude", "global", s, None, ["w"], **kw)  # noqa: E731
    assert spec(0.9).global_cap() == pytest.approx(0.95)
    assert spec(0.95).global_cap() == pytest.approx(0.975)
    assert spec(0.98).global_cap() == pytest.approx(0.99)  # at most 0.99: 1 % of every target stays
    assert spec(0.995).global_cap() == 0.995  # never below the sparsity: every target at 0.995 fits
    assert spec(0.9, cap=0.999).global_cap() == 0.999  # max_sparsity given: as given
    assert PruneSpec("unstructured", "magnitude", "layer", 0.9, None, ["w"]).global_cap() is None
    assert PruneSpec("2:4", "magnitude", "global", 0.5, None, ["w"]).global_cap() is None


def test_ties_prune_the_earlier_element_first():
    out = masks(Unstructured(), {"w": torch.ones(4)}, sparsity=0.5, scope="layer")
    assert out["w"].tolist() == [F, F, T, T]
    out = masks(Unstructured(), {"a": torch.ones(2), "b": torch.ones(2)}, sparsity=0.25)
    assert out["a"].tolist() == [F, T] and out["b"].tolist() == [T, T]


def test_threshold_mode_prunes_scores_below_it():
    s = {"w": torch.tensor([[0.1, 0.5], [0.3, 0.05]]), "v": torch.tensor([0.2, 0.19])}
    out = masks(Unstructured(), s, threshold=0.2)
    assert out["w"].tolist() == [[F, T], [T, F]]
    assert out["v"].tolist() == [T, F]  # equal to the threshold is kept


def test_two_four_on_a_2x8_tensor():
    w = torch.tensor(
        [
            [1.0, 4.0, 3.0, 2.0, 0.5, 0.1, 0.2, 0.3],
            [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0],
        ]
    )
    out = masks(NM(2, 4), {"w": w})["w"]
    assert out.tolist() == [
        [F, T, T, F, T, F, F, T],
        [F, F, T, T, T, T, F, F],  # ties: the first two of the group go
    ]


def test_n_m_on_a_conv_groups_input_channels():
    # shape (out=1, in=4, 1, 2): groups run across the 4 input channels at each kernel position
    w = torch.tensor([[[[1.0, 9.0]], [[2.0, 8.0]], [[3.0, 7.0]], [[4.0, 6.0]]]])
    out = masks(NM(1, 4), {"w": w})["w"]
    assert out[0, :, 0, 0].tolist() == [F, F, F, T]
    assert out[0, :, 0, 1].tolist() == [T, F, F, F]


def test_get_pattern_parses_and_rejects():
    assert get_pattern("2:4") == NM(2, 4)
    assert get_pattern("unstructured") == Unstructured()
    with pytest.raises(RegrowError, match="0 < n < m"):
        get_pattern("4:2")
    with pytest.raises(RegrowError, match="0 < n < m"):
        get_pattern("4:4")
    with pytest.raises(RegrowError, match=r"allowed values: channel, channel\+head, head, n:m.*unstructured"):
        get_pattern("blocky")


def test_n_m_checks_shapes_and_budget():
    p = NM(2, 4)
    with pytest.raises(RegrowError, match="6 inputs, which is not divisible by 4"):
        p.check({"w": torch.Size([3, 6])}, sparsity=None, threshold=None)
    with pytest.raises(RegrowError, match="fixes the sparsity at 0.5"):
        p.check({}, sparsity=0.7, threshold=None)
    with pytest.raises(RegrowError, match="do not give a threshold"):
        p.check({}, sparsity=None, threshold=0.1)
    p.check({"w": torch.Size([3, 8])}, sparsity=0.5, threshold=None)


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1, "0.5", True])
def test_sparsity_outside_unit_interval_rejected(sparsity):
    with pytest.raises(RegrowError, match=r"sparsity must be a number in \[0, 1\)"):
        Unstructured().check({}, sparsity=sparsity, threshold=None)


def test_both_or_neither_budget_rejected():
    with pytest.raises(RegrowError, match="both was given"):
        Unstructured().check({}, sparsity=0.5, threshold=0.1)
    with pytest.raises(RegrowError, match="neither was given"):
        Unstructured().check({}, sparsity=None, threshold=None)


def test_pruned_count_never_falls_short_of_the_sparsity():
    from regrow.patterns import pruned_count

    assert pruned_count(0.9, 70288) == 63260  # 63259.2 rounds up
    assert pruned_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert pruned_count(0.5, 3) == 2
    assert pruned_count(0.99, 12) == 11  # below 1 never empties a tensor (ceil would give 12)
    assert pruned_count(0.95, 1) == 0
    assert pruned_count(0.0, 5) == 0
    assert pruned_count(0.999999, 5) == 4  # 4.999995 would round up to all 5: one is kept
    assert pruned_count(1.0, 5) == 5


def test_row_scope_prunes_the_same_count_from_every_output_row():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.5, 9.0, 0.1], [1.0, 2.0, 3.0, 4.0]])
    keep = get_pattern("unstructured").make_masks({"w": scores}, sparsity=0.5, threshold=None, scope="row")["w"]
    # two per row; the tie at 0.5 in row 1 drops the earlier entry with 0.1
    assert keep.tolist() == [[True, False, True, False], [False, True, True, False], [False, False, True, True]]
    conv = torch.arange(24.0).reshape(2, 3, 2, 2)  # a conv weight: each output's 12 weights form its row
    keep = get_pattern("unstructured").make_masks({"c": conv}, sparsity=0.25, threshold=None, scope="row")["c"]
    assert keep.shape == conv.shape and (~keep).reshape(2, -1).sum(1).tolist() == [3, 3]
    assert not bool(keep.reshape(2, -1)[:, :3].any()) and bool(keep.reshape(2, -1)[:, 3:].all())
