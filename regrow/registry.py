"""Named registries with discovery, in the manner of timm's ``register_model`` / ``list_models``.

Patterns, criteria, schedules, recovery methods, built-in models, datasets and recipes are registered
by name so that recipes can refer to them and ``regrow list`` can show them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from regrow.errors import one_of

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with a one-line description per entry."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; ``doc`` defaults to its docstring's first line."""

        def add(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            text = doc if doc is not None else (getattr(obj, "__doc__", None) or "")
            self._docs[name] = text.strip().splitlines()[0] if text.strip() else ""
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise one_of(self.kind, name, self._items) from None

    def describe(self, name: str) -> str:
        return self._docs[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
