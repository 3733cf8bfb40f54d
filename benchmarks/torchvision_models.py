"""torchvision's model definitions where torchvision itself does not import (a CPU-only torch).

PyPI's torchvision wheels are built against CUDA: beside the CPU torch wheel its compiled operators (nms,
roi_align, ...) do not load, and the one import that fails on them is ``torchvision._meta_registrations``
(fake kernels for those operators), which no model definition uses. :func:`load` imports ``torchvision.models``
from an unpacked wheel (``pip install --no-deps --target DIR torchvision==X``; ``make install`` puts the one that
matches the CPU torch in ``.venv/torchvision-models``) with that module replaced by an empty one. The tests and
``python -m benchmarks.zoo --torchvision-models DIR`` use it; random initial weights only, nothing downloads.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

DEFAULT = Path(sys.prefix) / "torchvision-models"


def load(copy: Path = DEFAULT, *, keep: bool = False) -> types.ModuleType:
    """``torchvision.models`` from the unpacked wheel at ``copy``.

    With ``keep=False`` the copy is taken off ``sys.path`` and out of ``sys.modules`` afterwards, so that no other
    library takes it for an installed torchvision; the returned module keeps what it imported. ``keep=True``
    leaves it imported, for a library that imports torchvision itself (timm).
    """
    if not (copy / "torchvision").is_dir():
        raise FileNotFoundError(f"no unpacked torchvision in {copy} (make install puts one there)")
    sys.path.insert(0, str(copy))
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    try:
        return importlib.import_module("torchvision.models")
    finally:
        sys.path.remove(str(copy))
        if not keep:
            drop("torchvision")
        importlib.invalidate_caches()


def drop(package: str) -> None:
    """Forget ``package`` and its submodules (objects already imported from them stay usable)."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
