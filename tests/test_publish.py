"""Publication of a run's files as one set: a reader of the output folder sees the old run or the new one."""

import os
import signal
import time

import pytest

from conftest import interrupt_run
from regrow.errors import RegrowError
from regrow.io import RUN_FILES, STAGE_PREFIX, prepare_out_dir, staged_out_dir
from regrow.publish import CURRENT, STORE, Stage, signals_deferred

OLD = {"config.yaml": b"old", "report.json": b"old", "report.md": b"old", "allocation.json": b"old"}
NEW = {"config.yaml": b"new", "report.json": b"new", "report.md": b"new", "model.safetensors": b"new"}
NEWER = {"config.yaml": b"newer", "report.json": b"newer", "sensitivity.json": b"newer"}
posix = pytest.mark.skipif(os.name != "posix", reason="POSIX renames, links and signals")


def view(out):
    """What a reader of ``out`` sees: the run files, following links."""
    return {name: (out / name).read_bytes() for name in RUN_FILES if (out / name).is_file()}


def write(folder, files):
    for name, data in files.items():
        (folder / name).write_bytes(data)


def assert_tidy(out):
    """Nothing left over: no staging folder (here or next door), no other version, no link to nothing."""
    names = os.listdir(out)
    assert not [n for n in names + os.listdir(out.parent) if n.startswith(STAGE_PREFIX)]
    if STORE in names:
        assert sorted(os.listdir(out / STORE)) == sorted([CURRENT, os.readlink(out / STORE / CURRENT)])
    assert all((out / n).exists() for n in names), "a link to nothing was left"


def earlier(out, kind):
    """An output folder as the user has it before the run: returns the run files a reader sees."""
    if kind == "new":
        return {}
    out.mkdir()
    if kind == "empty":
        return {}
    (out / "mine.txt").write_text("keep")
    if kind == "plain":  # an earlier run of plain files (a new folder's, or an older regrow's)
        write(out, OLD)
    else:  # an earlier run already published over another one: links into .regrow-runs
        write(out, {"report.json": b"older"})
        with staged_out_dir(out, overwrite=True) as stage:
            write(stage, OLD)
        assert (out / "report.json").is_symlink()
    return dict(OLD)


KINDS = ["new", "empty", "plain", "linked"]


class Crash(Exception):
    """A failure injected at one rename (the process goes on: the finally blocks run)."""


def failing_renames(m, k, after):
    """The k-th os.replace / os.rename fails, before or after it renamed; returns the call counter."""
    calls = [0]

    def wrap(real):
        def rename(src, dst, **kwargs):
            calls[0] += 1
            if calls[0] == k and not after:
                raise Crash
            real(src, dst, **kwargs)
            if calls[0] == k and after:
                raise Crash

        return rename

    m.setattr(os, "replace", wrap(os.replace))
    m.setattr(os, "rename", wrap(os.rename))
    return calls


def publish_with_failure(monkeypatch, out, k, after):
    """Publish NEW into ``out`` with the k-th rename failing; returns how many renames were made or tried."""
    with monkeypatch.context() as m:
        try:
            with staged_out_dir(out, overwrite=True) as stage:
                write(stage, NEW)
                calls = failing_renames(m, k, after)
        except Crash:
            pass
    return calls[0]


@posix
@pytest.mark.parametrize("after", [False, True], ids=["fails-instead", "fails-after-renaming"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_failure_at_each_rename_of_the_publication_leaves_one_whole_run(tmp_path, monkeypatch, kind, after):
    (tmp_path / "count").mkdir()
    earlier(tmp_path / "count" / "out", kind)
    renames = publish_with_failure(monkeypatch, tmp_path / "count" / "out", 10**6, after)
    assert renames >= {"new": 2, "empty": 2, "plain": 8, "linked": 3}[kind]  # as the module docs describe
    for k in range(1, renames + 1):
        out = tmp_path / str(k) / "out"
        out.parent.mkdir()
        old = earlier(out, kind)
        publish_with_failure(monkeypatch, out, k, after)
        seen = view(out) if out.is_dir() else {}
        assert seen in (old, NEW), f"rename {k} of {renames}: a mix of the old and the new run"
        if kind not in ("new", "empty"):
            assert (out / "mine.txt").read_text() == "keep"
        if out.is_dir():
            assert_tidy(out)  # the failed run took back what it had added: no staging folder, version or link
        else:
            assert not out.parent.exists() or not any(out.parent.iterdir())
        with staged_out_dir(out, overwrite=True) as stage:  # the next run: whole, and nothing left over
            write(stage, NEWER)
        assert view(out) == NEWER
        assert_tidy(out)


def killed_at(out, k):
    """In a child process, publish NEW into ``out`` and die (os._exit: no cleanup at all, as SIGKILL or a power
    loss) right after the k-th rename. Returns True when the child got that far."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            calls = [0]

            def wrap(real):
                def rename(src, dst, **kwargs):
                    real(src, dst, **kwargs)
                    calls[0] += 1
                    if calls[0] == k:
                        os._exit(9)

                return rename

            os.replace, os.rename = wrap(os.replace), wrap(os.rename)
            with staged_out_dir(out, overwrite=True) as stage:
                write(stage, NEW)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) in (0, 9)
    return os.WEXITSTATUS(status) == 9


@posix
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_killed_after_each_rename_leaves_one_whole_run_and_the_next_run_cleans_up(tmp_path, kind):
    k = 0
    while True:
        k += 1
        out = tmp_path / str(k) / "out"
        out.parent.mkdir()
        old = earlier(out, kind)
        died = killed_at(out, k)
        assert (view(out) if out.is_dir() else {}) in (old, NEW), f"killed after rename {k}: a mix"
        with staged_out_dir(out, overwrite=True) as stage:
            write(stage, NEWER)
        assert view(out) == NEWER
        assert_tidy(out)
        if not died:
            break
    assert k > 2


def test_a_run_file_name_taken_by_a_folder_is_refused_and_the_old_run_kept(tmp_path):
    out = tmp_path / "out"
    with staged_out_dir(out) as stage:
        write(stage, OLD)
    (out / "report.md").unlink()
    (out / "report.md").mkdir()  # the user's own folder, where a run writes its report.md
    before = view(out)
    with pytest.raises(RegrowError, match=r"holds 'report.md', which is a folder.*Move or rename it"):
        prepare_out_dir(out, overwrite=True, create=False)  # refused before a run starts
    # The same folder appearing while a run is going: refused when publishing, the old run kept whole.
    (out / "report.md").rmdir()
    (out / "report.md").write_bytes(b"old")
    with pytest.raises(RegrowError, match="which is a folder"), staged_out_dir(out, overwrite=True) as stage:
        write(stage, NEW)
        (out / "report.md").unlink()
        (out / "report.md").mkdir()
    assert view(out) == before and (out / "report.md").is_dir()
    assert sorted(os.listdir(out)) == sorted([*before, "report.md"])  # no staging folder, no versions


def test_the_cli_refuses_a_run_file_name_taken_by_a_folder_without_a_traceback(tmp_path, capsys):
    from regrow.cli import main

    out = tmp_path / "out"
    out.mkdir()
    write(out, OLD)
    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    before = view(out)
    code = main(["run", "demo", "--overwrite", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "holds 'report.md', which is a folder" in err
    assert view(out) == before and sorted(os.listdir(out)) == sorted([*before, "report.md"])


def test_a_new_folder_gets_plain_files_and_an_earlier_run_becomes_links_to_one_version(tmp_path):
    out = tmp_path / "out"
    with staged_out_dir(out) as stage:
        write(stage, OLD)
    assert sorted(os.listdir(out)) == sorted(OLD) and not any((out / n).is_symlink() for n in OLD)
    (out / "mine.txt").write_text("keep")
    with staged_out_dir(out, overwrite=True) as stage:
        write(stage, NEW)
    assert view(out) == NEW and (out / "mine.txt").read_text() == "keep"
    assert all(os.readlink(out / n) == f"{STORE}/{CURRENT}/{n}" for n in NEW)  # relative: the folder can move
    assert not os.path.lexists(out / "allocation.json")  # the earlier run's, not written by this one
    assert_tidy(out)
    (out / "report.md").unlink()  # the user deletes one file: the next run publishes all its own again
    with staged_out_dir(out, overwrite=True) as stage:
        write(stage, NEWER)
    assert view(out) == NEWER and not os.path.lexists(out / "report.md")
    assert_tidy(out)


def test_an_existing_empty_folder_keeps_its_permissions(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o750)
    with staged_out_dir(out) as stage:
        write(stage, NEW)
    assert view(out) == NEW and out.stat().st_mode & 0o777 == 0o750


def make_orphan(folder, name):
    """A staging folder as a killed run leaves it (its flock gone with the process)."""
    (folder / name).mkdir(parents=True)
    (folder / name / "model.safetensors").write_bytes(b"half")
    return folder / name


@posix
def test_orphaned_staging_folders_are_cleaned_whatever_their_pid_and_live_ones_never(tmp_path):
    runs = tmp_path / "runs"
    # A killed run whose pid is alive again (here: this very process, as in a container where every run is pid 1).
    reused = make_orphan(runs / "a", f"{STAGE_PREFIX}{os.getpid()}-x1.flock")
    make_orphan(runs / "b", f"{STAGE_PREFIX}{os.getpid()}-x2.made.flock")  # it also made runs/b
    (runs / "c").mkdir()
    live = Stage(runs / "c", made=True)  # a run still writing there
    try:
        prepare_out_dir(runs / "a")  # not refused as non-empty: only a dead run's folder is there
        with staged_out_dir(runs / "d") as stage:
            write(stage, NEW)
        assert not reused.exists() and (runs / "a").is_dir()  # the user's runs/a stays, now empty
        assert not (runs / "b").exists()  # made by the killed run, held nothing else
        assert live.path.is_dir()  # never removed from under a running run
        with pytest.raises(RegrowError, match="is not empty"):
            prepare_out_dir(runs / "c")
    finally:
        live.close()
    assert not (runs / "c").exists() or not any((runs / "c").iterdir())


@posix
def test_a_run_killed_in_the_default_folder_is_cleaned_up_by_the_next_run_there(tmp_path):
    """SIGKILL while training into runs/<name>-<timestamp>: that folder holds only a staging folder; the next
    run into runs/ removes it."""
    runs = tmp_path / "runs"

    def ready():
        folders = list(runs.iterdir()) if runs.is_dir() else []
        return bool(folders) and any(n.startswith(STAGE_PREFIX) for n in os.listdir(folders[0]))

    argv = ["run", "demo", "--set", "model.train.epochs=500", "--set", "checkpoint.enabled=false", "-q"]
    interrupt_run(argv, tmp_path, ready, signal.SIGKILL, settle=0)
    killed = sorted(runs.iterdir())[0]
    assert [n.startswith(STAGE_PREFIX) for n in os.listdir(killed)] == [True]  # what SIGKILL leaves
    with staged_out_dir(runs / "next") as stage:
        write(stage, NEW)
    assert not killed.exists() and os.listdir(runs) == ["next"]


@posix
def test_sighup_ends_a_run_like_sigterm_and_leaves_the_earlier_run_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write(out, OLD)
    (out / "mine.txt").write_text("keep")
    before = sorted(os.listdir(out)), view(out)
    argv = ["run", "demo", "--out", str(out), "--overwrite", "--set", "model.train.epochs=500"]
    argv += ["--set", "checkpoint.enabled=false"]  # an interrupted run with checkpoints keeps them: test_resume
    ready = lambda: any(n.startswith(STAGE_PREFIX) for n in os.listdir(out))  # noqa: E731 - it trains, staging made
    code, err = interrupt_run(argv, tmp_path, ready, signal.SIGHUP)
    assert code == 128 + signal.SIGHUP and "regrow: terminated" in err and "Traceback" not in err, err
    assert (sorted(os.listdir(out)), view(out)) == before


@posix
def test_signals_during_the_publication_are_delivered_after_it():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.01)
            assert got == []  # not while the renames are going on
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_file_of_the_users_is_never_replaced_by_a_name_outside_the_run_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RegrowError, match="holds 'notes.txt'.*replaces only the files it lists"):
        with staged_out_dir(out, overwrite=True) as stage:
            write(stage, NEW)
            (stage / "notes.txt").write_text("not in RUN_FILES")
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@posix
def test_a_folder_without_symbolic_links_is_refused_before_the_run_and_a_failed_publication_keeps_the_old_run(
    tmp_path, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    write(out, OLD)

    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(os, "symlink", no_links)
        with pytest.raises(RegrowError, match="without symbolic links.*choose a new or empty --out"):
            prepare_out_dir(out, overwrite=True, create=False)
    with pytest.raises(RegrowError, match="could not be published .* holds the run it had before"):
        with monkeypatch.context() as m, staged_out_dir(out, overwrite=True) as stage:
            write(stage, NEW)
            m.setattr(os, "symlink", no_links)  # e.g. the disk filled up during the publication
    assert view(out) == OLD
    assert_tidy(out)


def test_a_checkpoint_inside_an_earlier_runs_versions_is_refused(tmp_path):
    from regrow.config import load_config
    from regrow.errors import RegrowError
    from regrow.pipeline.load import check_inputs_outside

    out = tmp_path / "out"
    (out / ".regrow-runs" / "v1").mkdir(parents=True)
    kept = out / ".regrow-runs" / "v1" / "weights.safetensors"
    kept.write_bytes(b"")
    cfg, _ = load_config("demo", [f"model.checkpoint={kept}"])
    with pytest.raises(RegrowError, match="earlier runs"):
        check_inputs_outside(cfg, out)
