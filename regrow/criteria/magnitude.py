"""Magnitude criterion: |w| (Han et al. 2015, "Learning both Weights and Connections")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from regrow.criteria.base import CRITERIA, LazyScores


@CRITERIA.register("magnitude")
def magnitude(model: nn.Module, targets: list[str], data: Iterable[Any] | None = None) -> Mapping[str, Tensor]:
    """|w|: small weights matter least (needs no data). Computed when read, a slice at a time (``LazyScores``),
    so ranking a large model's weights costs no copy of them."""
    return LazyScores(targets, lambda fqn: model.get_parameter(fqn).detach(), _abs)


@torch.no_grad()
def _abs(w: Tensor) -> Tensor:
    return w.abs().float()
