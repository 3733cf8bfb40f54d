import pytest
from torch import nn

from regrow.errors import RegrowError
from regrow.select import default_targets, final_classifier, resolve_targets


def test_default_targets_skip_final_classifier(mlp):
    assert final_classifier(mlp) == "head"
    assert default_targets(mlp) == ["fc1.weight", "fc2.weight"]
    assert resolve_targets(mlp) == ["fc1.weight", "fc2.weight"]


def test_targets_by_module_name_glob_and_fqn(mlp):
    assert resolve_targets(mlp, targets=["head"]) == ["head.weight"]
    assert resolve_targets(mlp, targets="fc*.weight") == ["fc1.weight", "fc2.weight"]
    assert resolve_targets(mlp, targets=["fc1.bias", "head.weight"]) == ["fc1.bias", "head.weight"]


def test_ignore_removes_targets(mlp):
    assert resolve_targets(mlp, ignore=["fc1"]) == ["fc2.weight"]


def test_target_matching_nothing_is_an_error_that_lists_parameters(mlp):
    with pytest.raises(RegrowError, match=r"'nope\.\*' matches no parameter.*fc1\.weight"):
        resolve_targets(mlp, targets=["nope.*"])
    with pytest.raises(RegrowError, match="ignore entry 'zzz'"):
        resolve_targets(mlp, ignore="zzz")


def test_nothing_left_is_an_error(mlp):
    with pytest.raises(RegrowError, match="no pruning targets"):
        resolve_targets(mlp, ignore=["fc1", "fc2"])
    with pytest.raises(RegrowError, match="besides its final classifier"):
        resolve_targets(nn.Sequential(nn.Linear(2, 2)))


def test_no_targets_left_names_the_reason():
    from regrow.select import resolve_targets

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(RegrowError, match="'targets' is an empty list"):
        resolve_targets(net, [])
    with pytest.raises(RegrowError, match="'ignore' removed every default target"):
        resolve_targets(net, None, "*")
    with pytest.raises(RegrowError, match="'ignore' removed every matched parameter"):
        resolve_targets(net, ["0.weight"], ["0.weight"])


def test_a_tied_weight_can_be_named_by_either_of_its_names():
    from regrow.select import resolve_targets

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    assert resolve_targets(model, ["head.weight"]) == ["emb.weight"]  # the same tensor, under its first name
    assert resolve_targets(model, ["head"]) == ["emb.weight"]
    assert resolve_targets(model, ["emb.weight", "fc.weight"], ignore=["head.weight"]) == ["fc.weight"]
