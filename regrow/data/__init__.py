"""Built-in datasets and the contract for user data factories.

A data factory (``"package.module:function"`` in a recipe) returns a :class:`DataBundle`, a mapping with
keys ``train``, ``test`` and optionally ``val``, or a tuple ``(train, test)`` / ``(train, val, test)``.
Each entry is a DataLoader or any re-iterable of ``(inputs, targets)`` batches. ``test`` is the held-out
split that reported accuracies come from; recovery never sees it.
"""

from __future__ import annotations

# Importing the modules registers the built-ins.
from regrow.data import digits as _digits  # noqa: F401
from regrow.data import fashion_mnist as _fashion_mnist  # noqa: F401
from regrow.data import text as _text  # noqa: F401
from regrow.data.bundle import DATASETS, DataBundle, as_bundle, select_classes

__all__ = ["DATASETS", "DataBundle", "as_bundle", "select_classes"]
