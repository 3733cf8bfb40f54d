"""File output that never destroys what the user had: atomic writes and a guarded output directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from regrow.errors import RegrowError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    A reader never sees a half-written file, and an error leaves the previous file untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


# What a run or a sensitivity analysis writes. --overwrite removes these (and only these) first, so no
# file from an earlier run can pass for this run's output.
RUN_FILES = (
    "config.yaml",
    "report.json",
    "report.md",
    "curve.png",
    "model.safetensors",
    "masks.safetensors",
    "shared.safetensors",
    "arch.json",
    "allocation.json",
    "sensitivity.json",
    "sensitivity.md",
    "sensitivity.png",
)


def prepare_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False, create: bool = True) -> Path:
    """Create the output directory, refusing a non-empty one unless ``overwrite`` is set.

    With ``overwrite``, the files regrow writes (``RUN_FILES``) are removed first; other files stay. With
    ``create=False`` only the check is made.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RegrowError(f"output path {str(out)!r} exists and is not a directory; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RegrowError(
            f"output directory {str(out)!r} is not empty; choose another --out, or pass --overwrite to "
            "replace the files regrow writes there (other files are left alone)."
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    return out
