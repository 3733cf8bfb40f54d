"""Publishing a run's files into its output folder as one set: a reader sees the old run or the new one.

A run writes into a staging folder inside its output folder, ``out/.regrow-partial-<pid>-<random>.flock``,
that it holds locked (``flock``) for as long as it lives; the kernel drops the lock when the process ends,
however it ends, so a staging folder whose lock can be taken belongs to a run that is gone, whatever its
pid. When the run has succeeded its files are published in one of two ways:

- **a new or empty folder** (nothing in it but the staging folder) is replaced by the staging folder
  itself: the staging folder moves next to ``out`` and is renamed onto the empty ``out``. The folder is
  empty, then whole; its files are plain files.
- **a folder with an earlier run or the user's own files** (``--overwrite``) gets the run as a version,
  ``out/.regrow-runs/<id>/``, and each run file ``out/<name>`` is a relative link to
  ``.regrow-runs/current/<name>``. ``current`` is itself a link to the version; publishing is one rename
  of a new ``current`` onto the old one, so every file flips at once. Links for names the new run adds
  are made before that rename (they show nothing until it), links for names it drops are removed after
  it (they show nothing from it on). An earlier run of plain files is first turned into a version in the
  same way (hard links, or copies where the file system has none): what a reader sees does not change.

Every file is flushed to disk (fsync) before anything a reader sees changes, and every folder whose
entries changed is flushed after the change, so after a power loss the folder holds the old run or the
new one as well. All changes to a folder's ``.regrow-runs`` and links are made holding a lock on the
folder itself; what a killed run left (staging folders, old versions, links to nothing) is removed by the
next run into the folder or next to it. Windows is not a target (no ``flock``; links need privileges).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from regrow.errors import RegrowError
from regrow.staging import (
    CHECKPOINT,
    LOCKED,
    MADE,
    STAGE_PREFIX,
    adopt_stage,
    folder_lock,
    fsync_dir,
    fsync_file,
    has_checkpoint,
    new_stage,
    remove_orphan,
    same,
    signals_deferred,
    sync_tree,
    token,
    umask,
)

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

STORE = ".regrow-runs"  # versions of a run published over an earlier one
CURRENT = "current"  # the link in STORE that names the version readers see
_DEFAULT_NAME = re.compile(r".+-\d{8}-\d{6}(-\d+)?")  # runs/<name>-<timestamp>, made by an older regrow
_PEEK = 256  # entries looked at in each folder next to the output folder (a run folder has ~15)


# ---------------------------------------------------------------------------------------- links, versions


def _link_text(name: str) -> str:
    return f"{STORE}/{CURRENT}/{name}"


def is_ours(path: Path) -> bool:
    """A run file published as a link to the current version."""
    try:
        return path.is_symlink() and os.readlink(path) == _link_text(path.name)
    except OSError:
        return False


def _current(out: Path) -> str | None:
    try:
        return os.readlink(out / STORE / CURRENT)
    except OSError:
        return None


def _point_current(store: Path, version: str) -> None:
    """One rename of a new ``current`` link onto the old one: the publication itself."""
    tmp = store / f".current-{token()}"
    os.symlink(version, tmp)
    os.replace(tmp, store / CURRENT)
    fsync_dir(store)


def _link(out: Path, name: str) -> None:
    tmp = out / STORE / f".link-{token()}"
    os.symlink(_link_text(name), tmp)
    os.replace(tmp, out / name)


def _keep(src: Path, dst: Path) -> None:
    """``dst`` holds what ``src`` holds: a hard link (the same file), else a copy flushed to disk."""
    try:
        os.link(src, dst, follow_symlinks=True)
    except OSError:
        shutil.copyfile(src, dst)
        fsync_file(dst)


def _version_name() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{token()}"


def visible(out: Path, names: Iterable[str] = RUN_FILES) -> dict[str, Path]:
    """The run files a reader of ``out`` sees now (following links), by name."""
    found = set(names)
    with suppress(OSError):
        found |= {e.name for e in os.scandir(out) if is_ours(Path(e.path))}
    return {name: out / name for name in sorted(found) if (out / name).is_file()}


def tidy(out: Path) -> None:
    """Drop what a publication leaves once ``current`` is settled: other versions, temporary links, and links
    to nothing (names the current run does not have). Call holding :func:`folder_lock`."""
    store = out / STORE
    changed = False
    if store.is_dir() and not store.is_symlink():
        target = _current(out)
        if target is None:
            shutil.rmtree(store, ignore_errors=True)
            changed = True
        else:
            for entry in os.scandir(store):
                if entry.name in (CURRENT, target):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with suppress(FileNotFoundError):
                        os.unlink(entry.path)
                changed = True
            if changed:
                fsync_dir(store)
    with suppress(OSError):
        for entry in os.scandir(out):
            if is_ours(Path(entry.path)) and not os.path.exists(entry.path):
                os.unlink(entry.path)
                changed = True
    if changed:
        fsync_dir(out)


def check_names(out: Path, names: Iterable[str] = RUN_FILES) -> None:
    """Refuse an output folder where a run file's name is taken by something regrow may not replace (a folder,
    a link to a folder, a pipe): the run would otherwise be half published."""
    store = out / STORE
    if store.is_symlink() or (store.exists() and not store.is_dir()):
        raise RegrowError(
            f"output directory {str(out)!r} holds {STORE!r}, which is not the folder regrow keeps its runs in; "
            "move it away, or choose another --out."
        )
    for name in sorted(set(names)):
        path = out / name
        if not os.path.lexists(path) or is_ours(path):
            continue
        if name not in RUN_FILES:  # only the files listed in the README are ever replaced
            raise RegrowError(
                f"output directory {str(out)!r} holds {name!r}, and this run writes a file of that name; regrow "
                "replaces only the files it lists as its own. Move or rename it, or choose another --out."
            )
        if path.is_file() or (path.is_symlink() and not path.exists()):
            continue
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise RegrowError(
            f"output directory {str(out)!r} holds {name!r}, which is {kind}; a run writes its own file {name} "
            "there, and regrow replaces only regular files (and links to them). Move or rename it, or choose "
            "another --out; nothing was changed."
        )


# ------------------------------------------------------------------------------------------ publication


def _publish_fresh(out: Path, stage: Path) -> bool:
    """Replace an ``out`` that holds nothing but ``stage`` by ``stage`` itself; False where it cannot be done
    (anything else in ``out``, ``out`` a link or a mount point): the caller publishes with links then."""
    aside = out.parent / stage.name
    if out.is_symlink() or os.listdir(out) != [stage.name] or os.path.lexists(aside):
        return False
    os.chmod(stage, stat.S_IMODE(os.stat(out).st_mode))  # the folder keeps the permissions it had
    try:
        os.rename(stage, aside)
    except OSError:  # e.g. out is a mount point (another file system than its parent)
        return False
    try:
        os.rename(aside, out)  # onto the empty folder: one atomic step
    except OSError:  # something appeared in out meanwhile, or the system refuses to replace it
        os.rename(aside, stage)
        return False
    fsync_dir(out.parent)
    return True


def _as_versions(out: Path, store: Path) -> None:
    """Turn the run files a reader sees into a version that ``current`` names, links in place of plain files;
    what a reader sees stays the same at every step."""
    seen = visible(out)
    if all(is_ours(path) for path in seen.values()):
        return
    version = store / _version_name()
    version.mkdir()
    for name, path in seen.items():
        _keep(path, version / name)
    fsync_dir(version)
    _point_current(store, version.name)  # links already there now read the same files through the copy
    for name, path in seen.items():
        if not is_ours(path):
            _link(out, name)  # a plain file (or a link of the user's) becomes a link to the same content
    fsync_dir(out)


def _publish_linked(out: Path, stage: Path, names: list[str]) -> Path:
    """Publish ``stage`` as a new version of ``out`` (see the module docs); returns the version folder."""
    store = out / STORE
    if not store.is_dir():
        store.mkdir()
        os.chmod(store, 0o777 & ~umask())
        fsync_dir(out)
    _as_versions(out, store)
    version = store / _version_name()
    os.rename(stage, version)
    fsync_dir(store)
    fsync_dir(out)
    for name in names:
        if not is_ours(out / name):
            _link(out, name)  # shows nothing until current names the version
    fsync_dir(out)
    _point_current(store, version.name)  # the publication: every run file flips at once
    tidy(out)
    return version


def check_links(out: Path) -> None:
    """Refuse, before a run, a folder where a run over an earlier one cannot be published: one on a file system
    without symbolic links (FAT, some network shares)."""
    probe = out / f".regrow-probe-{token()}"  # a link to nothing: if it were ever left, it is tidied away
    try:
        os.symlink(_link_text(probe.name), probe)
    except OSError as exc:
        raise RegrowError(
            f"output directory {str(out)!r} is on a file system without symbolic links ({exc.strerror or exc}), "
            "which a run needs to replace an earlier run there as one set; choose a new or empty --out."
        ) from None
    os.unlink(probe)


class Stage:
    """A run's staging folder in ``out``: written by the run, then :meth:`publish`-ed, or removed by
    :meth:`close`."""

    def __init__(self, out: Path, *, made: bool, adopt: Path | None = None) -> None:
        self.out = out
        if adopt is None:
            self.path, self._fd = new_stage(out, made=made)
        else:
            self.path, self._fd = adopt_stage(adopt)

    def publish(self) -> None:
        """Make the staged files the folder's run files, as one set (see the module docs); the run's checkpoint
        is not one of them and goes once they are published."""
        names = sorted(n for n in os.listdir(self.path) if n != CHECKPOINT)
        sync_tree(self.path)  # on disk before any entry a reader sees changes
        with folder_lock(self.out) as locked, signals_deferred():
            if not locked:
                raise RegrowError(f"output directory {str(self.out)!r} disappeared while the run was going.")
            check_names(self.out, [*RUN_FILES, *names])
            try:
                if _publish_fresh(self.out, self.path):
                    shutil.rmtree(self.out / CHECKPOINT, ignore_errors=True)
                else:
                    version = _publish_linked(self.out, self.path, names)  # the stage, renamed into the store
                    shutil.rmtree(version / CHECKPOINT, ignore_errors=True)
            except BaseException as exc:
                tidy(self.out)  # back to the run the folder had: the new version and links to nothing go
                if isinstance(exc, OSError):
                    raise RegrowError(
                        f"the run's files could not be published into {str(self.out)!r} ({exc}); the folder holds "
                        "the run it had before."
                    ) from exc
                raise

    def close(self, *, keep_checkpoint: bool = False) -> None:
        """Remove the staging folder wherever a publication left it, unless it is the published run, or it holds
        a checkpoint to keep (``keep_checkpoint``: the run was interrupted); release its lock."""
        if keep_checkpoint and has_checkpoint(self.path):
            os.close(self._fd)
            return
        places = [self.out / self.path.name, self.out.parent / self.path.name]
        with suppress(OSError):
            places += [Path(e.path) for e in os.scandir(self.out / STORE)]
        current = _current(self.out)
        for place in places:
            if place.name != current and same(place, self._fd):
                shutil.rmtree(place, ignore_errors=True)
        os.close(self._fd)


# --------------------------------------------------------------------------------------------- cleaning


def _made_by_killed_run(folder: Path, removed: list[str]) -> bool:
    return any(n.endswith(MADE + LOCKED) for n in removed) or (
        any(not n.endswith(LOCKED) for n in removed) and _DEFAULT_NAME.fullmatch(folder.name) is not None
    )


def clean(folder: Path, *, blocking: bool = True, remove_empty: bool = True, checkpoints: bool = False) -> bool:
    """Remove what killed runs left in ``folder``: staging folders whose run is gone (whatever their pid; those
    holding a checkpoint only when ``checkpoints``), old versions, links to nothing, a published run's
    checkpoint. A folder that such a run made and that now holds nothing is removed too when ``remove_empty``;
    returns whether the folder held only that."""
    with folder_lock(folder, blocking=blocking) as locked:
        if not locked:
            return False
        removed = []
        with suppress(OSError):
            for entry in list(os.scandir(folder)):
                if remove_orphan(Path(entry.path), checkpoints=checkpoints):
                    removed.append(entry.name)
        if (folder / CHECKPOINT).is_dir() and not (folder / CHECKPOINT).is_symlink():
            shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)  # published, killed before it was removed
        tidy(folder)
        leftover = _made_by_killed_run(folder, removed) and not any(folder.iterdir())
        if leftover and remove_empty:
            with suppress(OSError):
                folder.rmdir()
                fsync_dir(folder.parent)
        return leftover


def _has_leftovers(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            for i, entry in enumerate(entries):
                if entry.name.startswith(STAGE_PREFIX) or entry.name == STORE:
                    return True
                if i >= _PEEK:
                    return False
    except OSError:
        return False
    return False


def clean_around(out: Path, *, checkpoints: bool = False) -> bool:
    """What killed runs left in ``out`` (their checkpoints too when ``checkpoints``) and in the folders next to
    it (``runs/`` holds every default run folder; checkpoints there are kept); returns whether ``out`` itself
    was made by such a run and holds nothing else."""
    leftover = clean(out, remove_empty=False, checkpoints=checkpoints) if out.is_dir() else False
    here = Path(os.path.abspath(out))
    try:
        siblings = [Path(e.path) for e in os.scandir(here.parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return leftover
    for sibling in siblings:
        if sibling.name == here.name:
            continue
        if sibling.name.startswith(STAGE_PREFIX):  # left by a run killed while its new folder was being put in
            remove_orphan(sibling, checkpoints=True)  # place: not resumable from here, its files were complete
        elif _has_leftovers(sibling):
            clean(sibling, blocking=False)
    return leftover
