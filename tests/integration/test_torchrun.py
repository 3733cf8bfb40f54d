"""``torchrun --nproc-per-node 2 -m regrow run demo`` on the CPU (gloo): one report from rank 0, accuracies as one
process gets them, and a rank killed mid-run stops the job without a half-written folder; --resume finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "regrow"]
BUDGET = [
    "--no-progress",
    *("--set", "model.train.epochs=3"),
    *("--set", "recover.epochs=3"),
    *("--set", "evaluate.repeats=2"),
    *("--set", "evaluate.warmup=1"),
]
MID_EPOCH = ["--set", "checkpoint.every_steps=7"]  # the first checkpoint: step 7, inside the first epoch
RUN_FILES = {"report.json", "report.md", "model.safetensors", "masks.safetensors", "config.yaml"}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find a rank")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _accuracies(out: Path) -> dict[str, float]:
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {stage: snap["accuracy"] for stage, snap in report["snapshots"].items()}


def _results(out: Path) -> dict[str, tuple[float, float]]:
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {stage: (snap["accuracy"], snap["loss"]) for stage, snap in report["snapshots"].items()}


def _rank_pid(parent: int, rank: str) -> int | None:
    """The pid of the worker of ``rank`` that ``parent`` (torchrun) started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_two_ranks_write_one_report_with_the_accuracies_of_one_process(tmp_path: Path):
    single = subprocess.run(
        [sys.executable, "-m", "regrow", "run", "demo", "--out", str(tmp_path / "one"), *BUDGET],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    two = subprocess.run(
        [*TORCHRUN, "run", "demo", "--out", str(tmp_path / "two"), *BUDGET],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("report: ") == 1  # one summary, rank 0's
    assert RUN_FILES <= {p.name for p in (tmp_path / "two").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no other rank wrote anything here
    one_acc, two_acc = _accuracies(tmp_path / "one"), _accuracies(tmp_path / "two")
    assert one_acc.keys() == two_acc.keys() == {"baseline", "pruned", "recovered"}
    for stage in one_acc:  # shift augmentation draws differ (each rank draws for its half): within noise
        assert abs(one_acc[stage] - two_acc[stage]) <= 0.05, (stage, one_acc, two_acc)


def test_a_killed_rank_stops_the_job_and_resume_finishes_it(tmp_path: Path):
    out = tmp_path / "run"
    job = subprocess.Popen(
        [*TORCHRUN, "run", "demo", "--out", str(out), *BUDGET, *MID_EPOCH],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, victim = time.monotonic() + 300, None
        while time.monotonic() < deadline and job.poll() is None:
            if list(out.glob(".regrow-partial-*/.regrow-checkpoint/state.json")):  # a checkpoint is written
                victim = _rank_pid(job.pid, "1")
                if victim is not None:
                    os.kill(victim, signal.SIGKILL)
                    break
            time.sleep(0.02)
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert victim is not None, "the job ended before a checkpoint was written"
    assert job.returncode != 0
    assert "Signal 9 (SIGKILL)" in stderr and "rank      : 1" in stderr  # torchrun names the rank and the signal
    assert not RUN_FILES & {p.name for p in out.iterdir()}  # nothing published: no half-written folder
    assert list(out.glob(".regrow-partial-*/.regrow-checkpoint"))  # ... but the checkpoint, for --resume

    resumed = subprocess.run(
        [*TORCHRUN, "run", "demo", "--out", str(out), "--resume", *BUDGET, *MID_EPOCH],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".regrow-*"))  # staging folder and checkpoint gone once published
    reference = subprocess.run(  # the same job, not interrupted
        [*TORCHRUN, "run", "demo", "--out", str(tmp_path / "reference"), *BUDGET],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    # each rank resumed its own random streams (they part where the last batch splits unevenly): it ends alike
    assert _results(out) == _results(tmp_path / "reference")
