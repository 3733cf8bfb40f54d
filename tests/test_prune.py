import copy
import warnings

import pytest
import torch

import regrow
from regrow.errors import RegrowError
from regrow.measure.metrics import classification_metrics
from regrow.prune import compute_masks


def zeros(t):
    return int((t == 0).sum())


def test_prune_zeroes_weights_in_place_and_returns_masks(mlp):
    masks = regrow.prune(mlp, 0.75)
    n = mlp.fc1.weight.numel() + mlp.fc2.weight.numel()
    assert zeros(mlp.fc1.weight) + zeros(mlp.fc2.weight) == round(0.75 * n)
    assert zeros(mlp.head.weight) == 0  # the final classifier is not a default target
    assert masks.sparsity() == pytest.approx(0.75, abs=1 / n)
    for fqn, mask in masks.items():
        p = mlp.get_parameter(fqn)
        assert torch.equal(p != 0, mask)


def test_global_magnitude_keeps_the_largest_weights(mlp):
    before = torch.cat([mlp.fc1.weight.flatten(), mlp.fc2.weight.flatten()]).abs()
    regrow.prune(mlp, 0.5)
    after = torch.cat([mlp.fc1.weight.flatten(), mlp.fc2.weight.flatten()])
    kept = before[after != 0]
    dropped = before[after == 0]
    assert kept.min() >= dropped.max()


def test_layer_scope_gives_every_target_the_same_sparsity(mlp):
    masks = regrow.prune(mlp, 0.5, scope="layer")
    assert masks.per_target() == {"fc1.weight": 0.5, "fc2.weight": 0.5}


def test_threshold_mode(mlp):
    w = mlp.fc1.weight.detach().abs().clone()
    regrow.prune(mlp, threshold=0.1, targets=["fc1"])
    assert torch.equal(mlp.fc1.weight != 0, w >= 0.1)


def test_two_four_pattern_gives_half_sparsity_per_group(mlp):
    regrow.prune(mlp, pattern="2:4")
    groups = (mlp.fc2.weight != 0).reshape(-1, 4).sum(dim=1)
    assert groups.tolist() == [2] * groups.numel()


def test_taylor_needs_data_and_uses_it(mlp, batches):
    with pytest.raises(RegrowError, match="criterion 'taylor' needs data"):
        regrow.prune(mlp, 0.5, criterion="taylor")
    masks = regrow.prune(mlp, 0.5, criterion="taylor", data=batches)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)
    assert mlp.fc1.weight.grad is None  # scoring does not leave gradients behind


def test_random_criterion_is_seeded_by_torch(mlp):
    import copy

    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    torch.manual_seed(1)
    ma = regrow.prune(a, 0.5, criterion="random")
    torch.manual_seed(1)
    mb = regrow.prune(b, 0.5, criterion="random")
    assert all(torch.equal(ma[f], mb[f]) for f in ma)


def test_prune_records_spec_and_dense_copy(mlp):
    w = mlp.fc1.weight.detach().clone()
    masks = regrow.prune(mlp, 0.5)
    assert masks.spec.targets == ["fc1.weight", "fc2.weight"]
    assert torch.equal(masks.dense.fc1.weight, w)
    assert not masks.dense.fc1.weight.requires_grad


def test_previous_masks_stay_pruned(mlp):
    first = regrow.prune(mlp, 0.3)
    with torch.no_grad():  # make a pruned weight large: it must still stay pruned
        mlp.fc1.weight[~first["fc1.weight"]] = 100.0
    second = compute_masks(mlp, first.spec.with_sparsity(0.6), previous=first)
    for f in first:
        assert not (second[f] & ~first[f]).any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.5}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": 0.5, "threshold": 0.1}, "exactly one of sparsity"),
        ({}, "exactly one of sparsity"),
        ({"sparsity": 0.5, "pattern": "blocks"}, "unknown pattern 'blocks'; allowed values"),
        (
            {"sparsity": 0.5, "criterion": "wanda2"},
            "unknown criterion 'wanda2'; allowed values: bn_scale, magnitude, random, sparsegpt, taylor, wanda",
        ),
        ({"sparsity": 0.5, "scope": "model"}, "unknown scope 'model'; allowed values: global, layer"),
        ({"sparsity": 0.5, "targets": ["fc9"]}, "matches no parameter"),
        ({"pattern": "3:2"}, "0 < n < m"),
        ({"pattern": "2:3"}, "not divisible by 3"),
    ],
)
def test_bad_arguments_raise_one_clear_error(mlp, kwargs, message):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(RegrowError, match=message):
        regrow.prune(mlp, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())  # model untouched


def test_pruning_an_already_pruned_model_warns_that_masks_describe_one_call(mlp):
    model = mlp
    regrow.prune(model, 0.5)
    with pytest.warns(UserWarning, match=r"already hold 50.0% exact zeros"):
        regrow.prune(model, 0.3)


def test_a_threshold_above_every_weight_warns_that_everything_is_zero(mlp):
    with pytest.warns(UserWarning, match="threshold 100 is above every target weight's score"):
        regrow.prune(mlp, threshold=100.0)


def test_the_default_global_ranking_empties_no_target_and_recovers_at_least_as_well():
    """A layer whose weights are all small (scaled by 1/20, the next layer by 20: the same function, ReLU being
    positively homogeneous) loses every weight to an uncapped global magnitude ranking at 90 %; the default cap
    keeps half the overall density in it, and a short recovery ends better."""
    from regrow.data.digits import digits
    from regrow.models import mlp

    data = digits(batch_size=64, flatten=True, seed=0)
    torch.manual_seed(0)
    dense = mlp(in_features=64, hidden=128, depth=2)
    regrow.recover(
        dense, regrow.MaskSet({}), data.train, data.val, method="finetune", epochs=3, lr=3e-3, progress=False
    )
    with torch.no_grad():
        dense[3].weight.mul_(1 / 20)
        dense[3].bias.mul_(1 / 20)
        dense[5].weight.mul_(20)

    results = {}
    for name, cap in (("uncapped", {"max_sparsity": 1.0}), ("default", {})):
        model = copy.deepcopy(dense)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            masks = regrow.prune(model, 0.9, **cap)
        emptied = [f for f, m in masks.items() if not m.any()]
        kept = float(masks["3.weight"].float().mean())
        torch.manual_seed(1)
        regrow.recover(model, masks, data.train, data.val, method="finetune", epochs=2, lr=1e-3, progress=False)
        results[name] = (emptied, classification_metrics(model, data.test)["accuracy"], caught, kept)
    assert results["uncapped"][0] == ["3.weight"]  # today's ranking without a cap empties the small layer
    assert any("removed every weight of '3.weight'" in str(w.message) for w in results["uncapped"][2])
    assert results["default"][0] == []
    assert results["default"][3] >= 0.5 * (1 - 0.9) - 1 / 128**2  # half the overall density stays (to a weight)
    assert results["default"][1] >= results["uncapped"][1] + 0.2, results  # far better, not merely not worse
