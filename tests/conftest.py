"""Tiny models and data shared by the tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def make_batches(n_batches: int = 6, batch: int = 16, d_in: int = 8, classes: int = 3, seed: int = 0):
    """Linearly separable synthetic classification batches."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, classes, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, d_in, generator=g)
        out.append((x, (x @ w).argmax(dim=1)))
    return out


@pytest.fixture
def mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def macs_as_latency(monkeypatch):
    """Latency budgets measured deterministically: a model's 'latency' is its MACs on one sample."""
    import regrow.structural as structural
    from regrow.measure.cost import dense_macs
    from regrow.measure.latency import Latency

    def fake(first, second, inputs, rounds=15, warmup=5):
        one = inputs[:1]
        return (
            Latency(float(dense_macs(first, one)), 0, 0, 1, 1, 1, 0, "cpu"),
            Latency(float(dense_macs(second, one)), 0, 0, 1, 1, 1, 0, "cpu"),
        )

    monkeypatch.setattr(structural, "compare_latency", fake)
