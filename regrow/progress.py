"""Progress bars (tqdm) for training and evaluation; silent when stderr is not a terminal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Iterable[Any], desc: str, *, enabled: bool = True, total: int | None = None) -> tqdm:
    """A transient bar over ``iterable``; ``disable=None`` lets tqdm hide it on non-terminals (CI, logs)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=None if enabled else True,
        leave=False,
        unit="batch",
        dynamic_ncols=True,
    )
