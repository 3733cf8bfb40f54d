"""Resuming a killed run: SIGKILL at points in baseline training, recovery, export and publication, each
resumed with --resume, ends with the report.json numbers of the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import pytest

from forked import Forker

# Every run is a child forked from one process per test module that has already imported what a run imports
# (tests/forked.py): the tests start dozens of runs, each would spend about 5 s on imports alone on 2 cores. The
# reference run is such a child too. A child runs regrow's command line with one function wrapped to SIGKILL the
# process at a chosen point:
#   save:N   right after the N-th checkpoint write of this process
#   step:N   before this process's N-th optimizer step (between checkpoints: the work since the last is lost)
#   export   right after the run's files were exported into the staging folder
#   publish  just before the staged files are published
PRELOAD = r"""
import regrow.cli, regrow.pipeline
from regrow import publish
from regrow.recovery import checkpoint, loop
import sklearn.datasets, torch._dynamo  # the digits, and what the optimizer imports on first use

def arm(point):
    kind, _, n = point.partition(":")
    count = [0]

    def die_at(n_):
        count[0] += 1
        if count[0] == n_:
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "save":
        save = checkpoint.Phase.save
        def saved(self, *a, **k):
            save(self, *a, **k)
            die_at(int(n))
        checkpoint.Phase.save = saved
    elif kind == "step":
        step = loop._step
        def stepped(*a, **k):
            die_at(int(n))
            return step(*a, **k)
        loop._step = stepped
    elif kind == "export":
        export = regrow.pipeline.export_model
        def exported(*a, **k):
            out = export(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        regrow.pipeline.export_model = exported
    elif kind == "publish":
        def publishing(self):
            os.kill(os.getpid(), signal.SIGKILL)
        publish.Stage.publish = publishing
"""


@pytest.fixture(scope="module")
def forker():
    forker = Forker(PRELOAD)
    yield forker
    forker.close()


@pytest.fixture
def regrow_(forker, tmp_path):
    """``regrow_(point, *argv)``: runs ``regrow *argv`` in ``tmp_path`` armed to die at ``point``; returns the exit
    code (negative: the signal that ended it) and what it wrote to stderr."""

    def run(point, *argv):
        done = forker.run(f"arm({point!r})\nsys.exit(regrow.cli.main({list(argv)!r}))", tmp_path)
        return done.returncode, done.stderr

    return run


BUDGET = [
    "model.train.epochs=2",
    "recover.epochs=3",
    "recover.ema=0.9",
    "evaluate.latency=false",
    "checkpoint.every_steps=7",
    "sensitivity.batches=1",  # the curves are computed as usual, on one batch
]


def _numbers(out):
    report = json.loads((out / "report.json").read_text())
    stages = {k: (v["accuracy"], v["loss"]) for k, v in report["snapshots"].items()}
    history = [(h["epoch"], h["val_accuracy"], h["val_loss"], h["train_loss"]) for h in report["recovery"]["history"]]
    return stages, history, report["recovery"]["best_epoch"], report["recovery"]["stop_reason"]


def _where(out):
    """The phase and position the checkpoint in ``out`` holds (None: no checkpoint)."""
    found = [p for p in out.glob(".regrow-partial-*/.regrow-checkpoint/state.json")] if out.is_dir() else []
    if not found:
        return None
    last = json.loads(found[0].read_text())["phases"][-1]
    return last["index"], last["done"], last["epoch"], last["step"]


@pytest.mark.parametrize("recipe", ["demo"])
def test_a_run_killed_at_many_points_and_resumed_each_time_ends_as_an_uninterrupted_run(regrow_, tmp_path, recipe):
    args = ["run", recipe, "--no-progress", *[a for s in BUDGET for a in ("--set", s)]]
    rc, err = regrow_("none", *args, "--out", "ref")
    assert rc == 0, err
    expected = _numbers(tmp_path / "ref")

    out = tmp_path / "killed"
    # Counts are per process: each resumed process counts its own steps and saves from 1.
    points = ["step:5", "save:2", "step:25", "save:3", "save:4", "step:9", "export", "publish"]
    seen = []
    for point in points:
        rc, err = regrow_(point, *args, "--out", "killed", "--resume")
        assert rc == -signal.SIGKILL, f"{point}: {err[-2000:]}"
        seen.append((point, _where(out)))
    rc, err = regrow_("none", *args, "--out", "killed", "--resume")
    assert rc == 0, err
    assert _numbers(out) == expected
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))  # no checkpoint or staging folder left
    # where the kills landed: before any checkpoint, in baseline training (phase 0), in recovery (phase 1), and
    # after recovery ended (measuring, export, publication)
    where = [w for _, w in seen]
    assert where[0] is None, seen
    assert any(w and w[0] == 0 and not w[1] for w in where), seen
    assert any(w and w[0] == 1 and not w[1] for w in where), seen
    assert sum(1 for w in where if w and w[0] == 1 and w[1]) >= 2, seen  # export and publish


QUICK = ["evaluate.latency=false", "sensitivity.batches=1"]


@pytest.mark.parametrize(
    "recipe, budget",
    [
        # iterative rounds of channel pruning: round 2 prunes the weights round 1 handed back
        ("digits_resnet_channel", ["model.train.epochs=1", "recover.epochs=4"]),
        # three phases (baseline, recovery, weight sharing after it) and the sharing callback's codebooks
        ("digits_share", ["model.train.epochs=2", "recover.epochs=2", "recover.share.epochs=2"]),
        # the baseline's rewind point (weights kept by a callback) and rigl's moving masks
        ("digits_rewind_weights", ["model.train.epochs=3", "recover.epochs=2"]),
        (
            "digits_rigl",
            ["model.train.epochs=1", "recover.epochs=2", "recover.dynamic.update_every=5", "checkpoint.every_steps=9"],
        ),
    ],
)
def test_resuming_runs_with_several_phases_and_stateful_callbacks(regrow_, tmp_path, recipe, budget):
    args = ["run", recipe, "--no-progress", *[a for s in [*budget, *QUICK] for a in ("--set", s)]]
    rc, err = regrow_("none", *args, "--out", "ref")
    assert rc == 0, err
    where = []
    for point in ["save:5", "save:2", "export"]:
        rc, err = regrow_(point, *args, "--out", "killed", "--resume")
        assert rc == -signal.SIGKILL, f"{point}: {err[-2000:]}"
        where.append(_where(tmp_path / "killed"))
    rc, err = regrow_("none", *args, "--out", "killed", "--resume")
    assert rc == 0, err
    assert _numbers(tmp_path / "killed") == _numbers(tmp_path / "ref"), where
    assert where[-1][0] >= 1 and where[-1][1], where  # the last kill came after the last phase ended
