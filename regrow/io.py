"""File output that never destroys what the user had: atomic writes and a guarded output directory (its
run files published as one set by :mod:`regrow.publish`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from regrow.errors import RegrowError
from regrow.publish import (
    CURRENT,
    RUN_FILES,
    STAGE_PREFIX,
    STORE,
    Stage,
    check_links,
    check_names,
    clean_around,
    fsync_dir,
    fsync_file,
    is_orphan,
    is_ours,
    umask,
)

__all__ = ["RUN_FILES", "STAGE_PREFIX", "atomic_write", "atomic_write_text", "prepare_out_dir", "staged_out_dir"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    A reader never sees a half-written file, and an error leaves the previous file untouched. The file is
    flushed to disk before the rename and the folder after it, so a power loss leaves the old file or the new.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600, and some writers (safetensors) make their own 0600 file: give the result the
        # usual permissions once it is written
        os.chmod(tmp, 0o666 & ~umask())
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
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


def prepare_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False, create: bool = True) -> Path:
    """Check the output directory (and create it), refusing a non-empty one unless ``overwrite`` is set.

    Nothing in it is removed here: :func:`staged_out_dir` replaces the files regrow writes (``RUN_FILES``)
    only once a run has succeeded. What a killed run left (a staging folder whose run is gone, regrow's
    folder of versions with no run in it, links to nothing) does not count as content. A run file's name
    taken by a folder (or anything but a file) is refused: the run could not be published there. With
    ``create=False`` only the check is made.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RegrowError(f"output path {str(out)!r} exists and is not a directory; choose another --out.")
    if out.is_dir():
        check_names(out)
        content = sorted(e.name for e in out.iterdir() if not _leftover(e))
        if content and not overwrite:
            shown = ", ".join(repr(n) for n in content[:3]) + (", ..." if len(content) > 3 else "")
            raise RegrowError(
                f"output directory {str(out)!r} is not empty (it holds {shown}); choose another --out, or pass "
                "--overwrite to replace the files regrow writes there (other files are left alone)."
            )
        if content:
            check_links(out)
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


def _leftover(entry: Path) -> bool:
    """Left by a run that is gone: its staging folder, regrow's folder of versions with no current run in it,
    or a link to a run file that is no longer there."""
    if entry.name == STORE and entry.is_dir() and not entry.is_symlink():
        return not os.path.lexists(entry / CURRENT)
    return is_orphan(entry) or (is_ours(entry) and not entry.exists())


@contextmanager
def staged_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder inside the output directory; its files replace the run files there only on success,
    all at once.

    A run writes every file into the yielded folder. When the block ends without an error the files are
    published as one set (:mod:`regrow.publish`): a reader of ``path`` sees the earlier run or this one,
    never a mix, and the ``RUN_FILES`` of an earlier run that this run did not write are gone. A new or empty
    folder becomes the staging folder itself (plain files); a folder with an earlier run or other files
    gets the run files as links into ``path/.regrow-runs/``. When the block raises (a late error, Ctrl-C,
    SIGTERM or SIGHUP through the command line), ``path`` is left exactly as it was and the folders this run
    created (parents included) are removed again. What a killed run (SIGKILL, power loss) leaves is removed
    by the next run into ``path`` or next to it.
    """
    out = Path(path)
    created = [d for d in [out, *out.absolute().parents] if not d.exists()]  # deepest first
    prepare_out_dir(out, overwrite=overwrite)
    if clean_around(out) and not created:  # out was a killed run's folder and held nothing else
        created = [out]
    stage = Stage(out, made=bool(created))
    try:
        yield stage.path
        stage.publish()
    finally:
        stage.close()
        for folder in created:  # folders this run made and left empty (a failed run), parents included
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
