"""Magnitude criterion: |w| (Han et al. 2015, "Learning both Weights and Connections")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from regrow.criteria.base import CRITERIA


@CRITERIA.register("magnitude")
@torch.no_grad()
def magnitude(model: nn.Module, targets: list[str], data: Iterable[Any] | None = None) -> dict[str, Tensor]:
    """|w|: small weights matter least (needs no data)."""
    return {f: model.get_parameter(f).detach().abs().float() for f in targets}
