"""OWL allocation: outlier ratios of Wanda scores, and the per-target sparsities they give."""

import pytest
import torch
from torch import nn

import regrow
from regrow.errors import RegrowError
from regrow.owl import outlier_ratio, owl, owl_sparsities


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = torch.tensor([1.0] * 9 + [100.0])  # mean 10.9: only 100 is above 5 x 10.9
    assert outlier_ratio(scores) == pytest.approx(0.1)
    assert outlier_ratio(scores, m=100.0) == 0.0
    assert outlier_ratio(torch.ones(4, 4)) == 0.0


def test_more_outliers_less_sparsity_within_lambda_mean_kept():
    got = owl_sparsities({"a": 0.0, "b": 0.01, "c": 0.02}, 0.5, lam=0.08)
    assert got == pytest.approx({"a": 0.58, "b": 0.50, "c": 0.42}, abs=1e-12)
    assert owl_sparsities({"a": 0.03, "b": 0.03}, 0.7) == {"a": 0.7, "b": 0.7}


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


def test_owl_spares_the_layer_with_outlier_features_and_prune_meets_the_budget():
    torch.manual_seed(0)
    model = TwoLayers()
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        x = torch.randn(8, 16, generator=g)
        x[:, 3] *= 50.0  # one input feature of the first layer is huge: its scores are outliers
        data.append((x, torch.zeros(8, dtype=torch.long)))
    plan = owl(model, data, 0.6, lam=0.1)
    assert plan.per_target["first.weight"] == pytest.approx(0.5) and plan.per_target["second.weight"] == pytest.approx(
        0.7
    )
    assert plan.method == "owl" and "outlier ratio" in plan.notes[0]
    masks = regrow.prune(model, 0.6, criterion="wanda", data=data, allocation=plan.per_target)
    sizes = {f: m.numel() for f, m in masks.items()}
    removed = sum((~m).sum().item() for m in masks.values())
    rows = sum(m.shape[0] for m in masks.values())  # wanda compares within rows: each row rounds its own count
    assert removed / sum(sizes.values()) == pytest.approx(0.6, abs=rows / sum(sizes.values()))
    first, second = (1 - masks[f].float().mean().item() for f in ("first.weight", "second.weight"))
    assert first < 0.6 < second  # the layer with outliers keeps more


def test_owl_refuses_what_it_cannot_plan():
    model, data = TwoLayers(), [(torch.randn(4, 16), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(RegrowError, match=r"lam must be at least 0 and 2 x lam below both"):
        owl(model, data, 0.15, lam=0.08)
    with pytest.raises(RegrowError, match=r"sparsity must be in \(0, 1\)"):
        owl(model, data, 1.5)
    with pytest.raises(RegrowError, match="needs calibration data"):
        owl(model, None, 0.5)
