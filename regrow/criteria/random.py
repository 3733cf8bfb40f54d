"""Random criterion: a baseline every other criterion should beat."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from regrow.criteria.base import CRITERIA


@CRITERIA.register("random")
@torch.no_grad()
def random(model: nn.Module, targets: list[str], data: Iterable[Any] | None = None) -> dict[str, Tensor]:
    """Uniform random scores (a baseline; seeded by torch's global generator)."""
    out = {}
    for f in targets:
        p = model.get_parameter(f)
        out[f] = torch.rand(p.shape, device=p.device)
    return out
