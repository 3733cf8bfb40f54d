"""The data contract (:class:`DataBundle`) and the dataset registry, below the built-ins that register."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from regrow.errors import RegrowError
from regrow.registry import Registry


@dataclass
class DataBundle:
    train: Iterable[Any]
    test: Iterable[Any]
    val: Iterable[Any] | None = None
    num_classes: int | None = None
    description: str = ""


DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")


def as_bundle(obj: Any, source: str) -> DataBundle:
    """Accept a DataBundle, a mapping or a tuple from a data factory."""
    if isinstance(obj, DataBundle):
        return obj
    if isinstance(obj, Mapping):
        unknown = set(obj) - {"train", "val", "test", "num_classes", "description"}
        if unknown or "train" not in obj or "test" not in obj:
            raise RegrowError(
                f"{source} returned a mapping with keys {sorted(obj)}; it needs 'train' and 'test', and may have 'val'."
            )
        return DataBundle(**obj)
    if isinstance(obj, tuple) and len(obj) in (2, 3):
        return DataBundle(train=obj[0], test=obj[-1], val=obj[1] if len(obj) == 3 else None)
    raise RegrowError(
        f"{source} returned {type(obj).__name__}; it must return a regrow.data.DataBundle, a mapping with "
        "'train', 'test' (and optionally 'val'), or a tuple (train, test) or (train, val, test)."
    )


def select_classes(x: Any, y: Any, classes: list[int], num_classes: int) -> tuple[Any, Any]:
    """Keep the samples of ``classes`` and relabel them 0..len(classes)-1 in that order."""
    import numpy as np

    wanted = list(classes)
    bad = [c for c in wanted if not isinstance(c, int) or not 0 <= c < num_classes]
    if bad or len(set(wanted)) != len(wanted) or not wanted:
        raise RegrowError(f"classes must be distinct integers in [0, {num_classes}); got {classes!r}.")
    y = np.asarray(y)
    keep = np.isin(y, wanted)
    relabel = {c: i for i, c in enumerate(wanted)}
    return x[keep], np.array([relabel[int(v)] for v in y[keep]], dtype=np.int64)
