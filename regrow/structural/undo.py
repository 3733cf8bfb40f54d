"""Handing a model back as it came when ``shrink`` fails part-way through the surgery."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from regrow.structural.report import StructureReport


class _Undo:
    """Everything ``shrink`` may change, kept so that a failure can put it back: every module's attributes
    (its submodules, parameters, buffers, hooks and train/eval mode, as the very objects the caller holds) and
    the data of every parameter and buffer. The surgery replaces these rather than editing them, so keeping
    references costs no copy."""

    NESTED = ("_parameters", "_buffers", "_modules")

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, self._copy(m.__dict__)) for m in model.modules()]
        self.data = [
            (t, t.data)
            for m, _ in self.modules
            for t in [*m._parameters.values(), *m._buffers.values()]
            if t is not None
        ]

    def restore(self) -> None:
        """Put every module's attributes and every tensor's data back."""
        for module, attributes in self.modules:
            module.__dict__.clear()
            module.__dict__.update(self._copy(attributes))
        for tensor, data in self.data:
            tensor.data = data

    @classmethod
    def _copy(cls, attributes: dict[str, Any]) -> dict[str, Any]:
        """The attributes, with their own copies of the dicts the surgery edits."""
        return {k: type(v)(v) if k in cls.NESTED else v for k, v in attributes.items()}


def _hands_back_on_failure(fn: Callable[..., StructureReport]) -> Callable[..., StructureReport]:
    """Run ``fn(model, ...)``; when it raises, put ``model`` back as it came (see :class:`_Undo`)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> StructureReport:
        undo = _Undo(model)
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            undo.restore()
            raise

    return wrapper
