"""File output that never destroys what the user had: atomic writes and a guarded output directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
        write(tmp)
        # mkstemp creates 0600, and some writers (safetensors) make their own 0600 file: give the result the
        # usual permissions once it is written
        os.chmod(tmp, 0o666 & ~_umask())
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


# What a run or a sensitivity analysis writes. A finished run with --overwrite replaces these (and only
# these), so no file from an earlier run can pass for this run's output.
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


STAGE_PREFIX = ".regrow-partial-"  # a run's files are written here first (see staged_out_dir)


def _leftover_stage(entry: Path) -> bool:
    """A staging folder whose run is gone (killed with SIGKILL, or the machine went down)."""
    if not (entry.is_dir() and entry.name.startswith(STAGE_PREFIX)):
        return False
    pid = entry.name[len(STAGE_PREFIX) :].split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists, but belongs to someone else
        return False
    return False  # a run still writing there: its folder is content, and is never removed


def prepare_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False, create: bool = True) -> Path:
    """Check the output directory (and create it), refusing a non-empty one unless ``overwrite`` is set.

    Nothing in it is removed here: :func:`staged_out_dir` replaces the files regrow writes (``RUN_FILES``)
    only once a run has succeeded. A staging folder left by a run that was killed does not count as content.
    With ``create=False`` only the check is made.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RegrowError(f"output path {str(out)!r} exists and is not a directory; choose another --out.")
    if out.is_dir() and not overwrite and any(not _leftover_stage(e) for e in out.iterdir()):
        raise RegrowError(
            f"output directory {str(out)!r} is not empty; choose another --out, or pass --overwrite to "
            "replace the files regrow writes there (other files are left alone)."
        )
    existing = next(d for d in [out, *out.absolute().parents] if d.exists())
    if not existing.is_dir():
        raise RegrowError(f"output path {str(out)!r} cannot be created: {str(existing)!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RegrowError(f"output path {str(out)!r} cannot be written: no write permission on {str(existing)!r}.")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegrowError(f"output directory {str(out)!r} cannot be created ({exc.strerror or exc}).") from None
    return out


@contextmanager
def staged_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder inside the output directory; its files replace the run files there only on success.

    A run writes every file into the yielded folder. When the block ends without an error the files move
    into ``path`` (each an atomic rename) and the ``RUN_FILES`` of an earlier run that this run did not
    write are removed, so nothing stale passes for this run's output. When the block raises (a late error,
    Ctrl-C, or SIGTERM through the command line), ``path`` is left exactly as it was: an earlier run kept
    with ``--overwrite`` survives, and the folders this run created (parents included) are removed again.
    A run killed outright (SIGKILL) leaves its hidden staging folder; the next run into ``path`` removes it.
    """
    out = Path(path)
    created = [d for d in [out, *out.absolute().parents] if not d.exists()]  # deepest first
    prepare_out_dir(out, overwrite=overwrite)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=out))
    except OSError as exc:
        raise RegrowError(f"output directory {str(out)!r} cannot be written ({exc.strerror or exc}).") from None
    try:
        yield stage
        for name in RUN_FILES:
            if not (stage / name).exists():
                (out / name).unlink(missing_ok=True)
        for entry in stage.iterdir():
            os.replace(entry, out / entry.name)
        for entry in out.iterdir():  # staging folders of runs that were killed
            if _leftover_stage(entry) and entry != stage:
                shutil.rmtree(entry, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # folders this run made and left empty (a failed run), parents included
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
