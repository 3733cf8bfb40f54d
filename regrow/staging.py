"""Staging folders: where a run writes before it publishes (:mod:`regrow.publish`), and how a folder left by a
run that is gone is told from a live run's.

A staging folder, ``out/.regrow-partial-<pid>-<random>.flock``, is held locked (``flock``) by its run for as long
as the run lives; the kernel drops the lock when the process ends, however it ends, so a staging folder whose
lock can be taken belongs to a run that is gone, whatever its pid. Such an orphan is removed by the next run
into the folder or next to it, unless it holds a run's checkpoint (``CHECKPOINT``): that one waits for
``regrow run --resume``, which takes it over (:func:`adopt_stage`), or for ``--overwrite``, which deletes it.
Also here: flushing files and folders to disk, folder locks, and deferring signals while a folder changes.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from regrow.errors import RegrowError

try:
    import fcntl
except ImportError:  # not POSIX: staging folders are then never taken for a dead run's
    fcntl = None  # type: ignore[assignment]

STAGE_PREFIX = ".regrow-partial-"  # a run's files are written here first
CHECKPOINT = ".regrow-checkpoint"  # in a staging folder: the run's training checkpoints, for --resume
CHECKPOINT_STATE = "state.json"  # in CHECKPOINT: what started the run and where it is
LOCKED = ".flock"  # a staging folder whose life is its flock (older regrow named them by pid only)
MADE = ".made"  # ... made by a run that also made the output folder: a killed one leaves nothing else


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (renames, new and removed names); a no-op where the system refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(os.path.join(root, name))
        for name in dirs:
            fsync_dir(os.path.join(root, name))
    fsync_dir(folder)


def token() -> str:
    return secrets.token_hex(4)


def open_dir(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def lock(fd: int, *, blocking: bool) -> bool:
    """Take the flock on ``fd``; False when another process holds it. Where the system has no locks, a blocking
    caller goes on without one, and a liveness check takes the folder for a live run's (never removed)."""
    if fcntl is None:
        return blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK: a file system without locks
        return blocking
    return True


def same(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.lstat(path), os.fstat(fd))
    except OSError:
        return False


@contextmanager
def folder_lock(folder: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the publication lock of ``folder`` (a flock on the folder itself); yields False when it cannot be
    had (another run is publishing there and ``blocking`` is off, or the folder is gone)."""
    while True:
        fd = open_dir(folder)
        if fd is None or not lock(fd, blocking=blocking):
            if fd is not None:
                os.close(fd)
            yield False
            return
        if same(folder, fd):
            break
        os.close(fd)  # the folder was replaced (published) while we waited: lock the one there now
    try:
        yield True
    finally:
        os.close(fd)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP that arrive inside the block are delivered when it ends (main thread only):
    the few renames of a publication and their tidying are not cut in half by Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not None:  # None: a handler not set from Python
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)  # now, to the handler the caller had


# ----------------------------------------------------------------------------------------------- staging


def new_stage(out: Path, *, made: bool) -> tuple[Path, int]:
    """A new staging folder in ``out``, locked by the returned descriptor until it is closed."""
    suffix = (MADE if made else "") + LOCKED
    for _ in range(50):
        try:
            path = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", suffix=suffix, dir=out))
        except FileNotFoundError:  # removed meanwhile as a killed run's empty folder: make it again
            out.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as exc:
            raise RegrowError(f"output directory {str(out)!r} cannot be written ({exc.strerror or exc}).") from None
        fd = open_dir(path)
        if fd is None:
            continue
        lock(fd, blocking=True)  # waits only while a cleaner that found it unlocked is removing it
        if same(path, fd):
            with suppress(OSError):
                os.chmod(path, 0o777 & ~umask())  # mkdtemp makes 0700; a published folder is read by others
            return path, fd
        os.close(fd)
    raise RegrowError(f"output directory {str(out)!r}: no staging folder could be made in it; try again.")


def adopt_stage(path: Path) -> tuple[Path, int]:
    """Take over the staging folder of a run that is gone, to resume it: locked, emptied but for its checkpoint."""
    fd = open_dir(path)
    if fd is None or not lock(fd, blocking=False):
        if fd is not None:
            os.close(fd)
        raise RegrowError(f"the checkpoint in {str(path)!r} is in use by a run that is still going; wait for it.")
    for entry in os.scandir(path):
        if entry.name != CHECKPOINT:  # the files of the run that stopped: this run writes them again
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
    for entry in os.scandir(path / CHECKPOINT):
        if entry.name.endswith(".tmp"):  # a checkpoint file the kill cut off while it was written
            os.unlink(entry.path)
    return path, fd


def _legacy_dead(name: str) -> bool:
    """A staging folder of an older regrow (no lock): its run is gone when its pid is."""
    pid = name[len(STAGE_PREFIX) :].split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists, but belongs to someone else
        return False
    return False


def is_stage(path: Path) -> bool:
    return path.name.startswith(STAGE_PREFIX) and path.is_dir() and not path.is_symlink()


def is_orphan(path: Path) -> bool:
    """A staging folder whose run is gone (killed, or the machine went down); a live run's never is."""
    if not is_stage(path):
        return False
    if not path.name.endswith(LOCKED):
        return _legacy_dead(path.name)
    fd = open_dir(path)
    if fd is None:
        return False
    try:
        return lock(fd, blocking=False)
    finally:
        os.close(fd)


def has_checkpoint(stage: Path) -> bool:
    """Whether a staging folder holds a run's checkpoint (``regrow run --resume`` continues it)."""
    return (stage / CHECKPOINT / CHECKPOINT_STATE).is_file()


def checkpoint_stages(out: Path) -> list[Path]:
    """The staging folders in ``out`` of runs that are gone and left a checkpoint, the newest first."""
    try:
        found = [Path(e.path) for e in os.scandir(out) if e.name.startswith(STAGE_PREFIX)]
    except OSError:
        return []
    written = {}
    for p in found:
        with suppress(OSError):  # gone meanwhile (a run with --overwrite removed it)
            if has_checkpoint(p) and is_orphan(p):
                written[p] = (p / CHECKPOINT / CHECKPOINT_STATE).stat().st_mtime
    return sorted(written, key=written.__getitem__, reverse=True)


def remove_orphan(path: Path, *, checkpoints: bool = False) -> bool:
    """Remove ``path`` if it is an orphaned staging folder (holding its lock while removing it); one that holds
    a checkpoint only when ``checkpoints``."""
    if not is_stage(path) or (not checkpoints and has_checkpoint(path)):
        return False
    if not path.name.endswith(LOCKED):
        if not _legacy_dead(path.name):
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    fd = open_dir(path)
    if fd is None:
        return False
    try:
        if not lock(fd, blocking=False):
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        os.close(fd)
