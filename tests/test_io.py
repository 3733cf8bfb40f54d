"""The output directory: a run's files replace an earlier run's only when it succeeds."""

import os
import subprocess
import sys

import pytest

from regrow.errors import RegrowError
from regrow.io import STAGE_PREFIX, prepare_out_dir, staged_out_dir


def test_a_successful_run_replaces_only_regrow_files_and_leaves_no_staging_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (out / "report.json").write_text("old")
    (out / "allocation.json").write_text("old, and not written by the new run")
    with staged_out_dir(out, overwrite=True) as stage:
        assert stage.parent == out and stage.name.startswith(f"{STAGE_PREFIX}{os.getpid()}-")
        assert (out / "report.json").read_text() == "old"  # nothing replaced while the run is going
        (stage / "report.json").write_text("new")
    # an earlier run's folder is published by one swap of a link: the versions live in the hidden .regrow-runs
    assert sorted(p.name for p in out.iterdir() if p.name != ".regrow-runs") == ["mine.txt", "report.json"]
    assert not os.path.lexists(out / "allocation.json")
    assert (out / "report.json").read_text() == "new" and (out / "mine.txt").read_text() == "keep"


def test_a_failed_run_removes_the_folders_it_created_and_only_those(tmp_path):
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "a" / "b" / "c", tmp_path / "kept" / "new", tmp_path / "kept"):
        with pytest.raises(RuntimeError), staged_out_dir(out) as stage:
            (stage / "config.yaml").write_text("x")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # a/b/c and kept/new gone, kept stays
    assert list((tmp_path / "kept").iterdir()) == []


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_live_runs_staging_folder_is_content_and_a_dead_ones_is_not(tmp_path):
    out = tmp_path / "out"
    live = out / f"{STAGE_PREFIX}{os.getpid()}-abc"  # this process is alive: a run still writing there
    live.mkdir(parents=True)
    with pytest.raises(RegrowError, match="is not empty"):
        prepare_out_dir(out)
    with staged_out_dir(out, overwrite=True) as stage:
        (stage / "report.json").write_text("new")
    assert live.is_dir()  # never removed from under a running run

    other = tmp_path / "other"
    dead = other / f"{STAGE_PREFIX}{_dead_pid()}-abc"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_text("half")
    prepare_out_dir(other)  # not refused: the run that made it is gone
    with staged_out_dir(other) as stage:
        (stage / "report.json").write_text("new")
    assert sorted(p.name for p in other.iterdir()) == ["report.json"]


def test_an_output_path_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RegrowError, match="afile' is a file, not a folder"):
        prepare_out_dir(tmp_path / "afile" / "sub", create=False)
    with pytest.raises(RegrowError, match="exists and is not a directory"):
        prepare_out_dir(tmp_path / "afile", create=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_folder_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(RegrowError, match="no write permission"):
            prepare_out_dir(locked / "out", create=False)
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where nobody can create folders")
def test_a_folder_the_system_refuses_is_a_clear_error():
    with pytest.raises(RegrowError, match="cannot be (created|written)"):
        prepare_out_dir("/proc/regrow-out/run")


def test_written_files_get_the_usual_permissions_also_from_writers_that_make_their_own(tmp_path):
    import torch
    from safetensors.torch import save_file

    from regrow.io import atomic_write

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
    finally:
        os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
