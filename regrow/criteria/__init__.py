"""Importance criteria: ``score(model, targets, data) -> {fqn: tensor}``; higher means more important.

Every criterion works with every pattern: patterns only see the scores. Register a new one with
``@CRITERIA.register("name")``.
"""

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

# Importing the modules registers their criteria.
from regrow.criteria import bn_scale as _bn_scale  # noqa: E402,F401
from regrow.criteria import magnitude as _magnitude  # noqa: E402,F401
from regrow.criteria import random as _random  # noqa: E402,F401
from regrow.criteria import taylor as _taylor  # noqa: E402,F401

__all__ = ["CRITERIA", "Criterion"]
