"""File output that never destroys what the user had: atomic writes and a guarded output directory (its
run files published as one set by :mod:`regrow.publish`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from regrow.errors import RegrowError, first_line, interruption
from regrow.publish import (
    CURRENT,
    RUN_FILES,
    STORE,
    Stage,
    check_links,
    check_names,
    clean_around,
    is_ours,
)
from regrow.staging import (
    CHECKPOINT,
    CHECKPOINT_STATE,
    STAGE_PREFIX,
    checkpoint_stages,
    fsync_dir,
    fsync_file,
    has_checkpoint,
    is_orphan,
    umask,
)

log = logging.getLogger("regrow")

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


def describe(folder: Path) -> str:
    """Where the run whose checkpoint is ``folder`` stopped, in words (``regrow.recovery.checkpoint`` writes it)."""
    try:
        state = json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        last = state["phases"][-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "before its first epoch ended"
    where = f"training phase {last['index'] + 1} ({last['label']}) " + (
        "ended" if last["done"] else f"at epoch {last['epoch']} of {last['epochs']}, step {last['step']}"
    )
    return f"{where}; written {state.get('written', '?')}"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def prepare_out_dir(
    path: str | os.PathLike[str], *, overwrite: bool = False, create: bool = True, resume: bool = False
) -> Path:
    """Check the output directory (and create it), refusing a non-empty one unless ``overwrite`` is set.

    Nothing in it is removed here: :func:`staged_out_dir` replaces the files regrow writes (``RUN_FILES``)
    only once a run has succeeded. What a killed run left (a staging folder whose run is gone, regrow's
    folder of versions with no run in it, links to nothing) does not count as content. A run file's name
    taken by a folder (or anything but a file) is refused: the run could not be published there. So is a folder
    holding the checkpoint of an interrupted run, unless the run is ``resume``-d or ``overwrite`` starts over.
    With ``create=False`` only the check is made.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RegrowError(f"output path {str(out)!r} exists and is not a directory; choose another --out.")
    if out.is_dir():
        check_names(out)
        stopped = checkpoint_stages(out)
        if stopped and not (overwrite or resume):
            raise RegrowError(
                f"output directory {str(out)!r} holds the checkpoint of an interrupted run "
                f"({describe(stopped[0] / CHECKPOINT)}); continue it with `regrow run ... --resume`, or pass "
                "--overwrite to start over (the checkpoint is then deleted)."
            )
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
    if entry.name == CHECKPOINT:  # a published run's checkpoint, left by a kill in the instant after publishing
        return True
    return is_orphan(entry) or (is_ours(entry) and not entry.exists())


@contextmanager
def staged_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
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

    A staging folder holding a checkpoint (``CHECKPOINT``, written by the run) is kept when the run is
    interrupted or fails for a reason of its surroundings (any error but a ``RegrowError``); with ``resume`` the
    newest such folder in ``path`` is taken over, else ``overwrite`` deletes them (and without either, the
    folder is refused).
    """
    out = Path(path)
    created = [d for d in [out, *out.absolute().parents] if not d.exists()]  # deepest first
    prepare_out_dir(out, overwrite=overwrite or resume, resume=resume)
    stopped = checkpoint_stages(out) if resume else []
    if clean_around(out, checkpoints=not resume) and not created:  # out was a killed run's folder, nothing else
        created = [out]
    stage = Stage(out, made=bool(created), adopt=stopped[0] if stopped else None)
    keep, publishing = False, False
    try:
        yield stage.path
        publishing = True
        stage.publish()
    except BaseException as exc:
        # kept unless the run itself was refused; always when publishing failed (a full disk, a name taken)
        keep = publishing or not isinstance(exc, RegrowError)
        if keep and has_checkpoint(stage.path):
            log.warning(
                "the run stopped (%s); its checkpoint (%s) is kept in %s: run the same command with --resume to "
                "continue it.",
                "interrupted" if interruption(exc) is not None else first_line(exc),
                describe(stage.path / CHECKPOINT),
                out,
            )
        raise
    finally:
        stage.close(keep_checkpoint=keep)
        for folder in created:  # folders this run made and left empty (a failed run), parents included
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
