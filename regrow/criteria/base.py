"""The criterion contract and registry, below the modules that register into it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from torch import Tensor, nn

from regrow.registry import Registry


class Criterion(Protocol):
    def __call__(
        self, model: nn.Module, targets: list[str], data: Iterable[Any] | None = None
    ) -> dict[str, Tensor]: ...


CRITERIA: Registry[Callable[..., dict[str, Tensor]]] = Registry("criterion")


def is_calibrated(name: str) -> bool:
    """Whether criterion ``name`` prunes layer by layer from calibration inputs (``wanda``, ``sparsegpt``)."""
    return name in CRITERIA and bool(getattr(CRITERIA.get(name), "calibrated", False))
