"""BatchNorm scale criterion: |gamma| of the BatchNorm after each channel (Liu et al. 2017, "Network Slimming").

It scores whole channels, so it only works with pattern 'channel' (see regrow.structural.importance).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from regrow.criteria.base import CRITERIA
from regrow.errors import RegrowError


@CRITERIA.register("bn_scale")
def bn_scale(model: nn.Module, targets: list[str], data: Iterable[Any] | None = None) -> dict[str, Tensor]:
    """|gamma| of the BatchNorm after each channel (pattern 'channel' only)."""
    raise RegrowError(
        "criterion 'bn_scale' scores whole channels by their BatchNorm scale; use it with pattern 'channel'."
    )
