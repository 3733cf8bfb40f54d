"""Checkpoints and resume: the loop's state saved and put back exactly, and every refusal of a resume."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regrow
from regrow.cli import main
from regrow.errors import RegrowError
from regrow.recovery import checkpoint
from regrow.recovery.checkpoint import Checkpoints, callback_state, generators, identity, rng_state, set_rng_state

BUDGET = ["model.train.epochs=2", "recover.epochs=2", "evaluate.latency=false"]


def _setup():
    torch.manual_seed(0)
    x = torch.randn(160, 12)
    y = (x[:, :3].sum(1) > 0).long() + 2 * (x[:, 3] > 0).long()
    train = DataLoader(
        TensorDataset(x[:128], y[:128]), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    val = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=32)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 4))
    return model, regrow.prune(model, 0.5), train, val


STOP_AT = [0]


class _Interrupt:
    """Stands for a kill: raises KeyboardInterrupt after optimizer step STOP_AT[0] (a global: a callback's own
    attributes are checkpointed and put back on resume)."""

    def on_train_start(self, state):
        pass

    def on_step_end(self, state):
        if state.step == STOP_AT[0]:
            raise KeyboardInterrupt

    def checkpoint_ready(self, state):
        return True


@pytest.mark.parametrize("every_steps", [None, 3])
@pytest.mark.parametrize("stop", [5, 8, 13, 21])
def test_recovery_interrupted_anywhere_resumes_to_the_same_weights(tmp_path, every_steps, stop):
    # 8 steps per epoch, 3 epochs; rigl moves masks, ema keeps an average, dropout draws from the generator
    kw = dict(method="rigl", epochs=3, patience=None, ema=0.9, progress=False, dynamic={"update_every": 4})
    model, masks, train, val = _setup()
    STOP_AT[0] = -1
    reference = regrow.recover(model, masks, train, val, callbacks=[_Interrupt()], **kw)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, masks, train, val = _setup()
    STOP_AT[0] = stop
    saves = Checkpoints(tmp_path / "ck", identity("cfg"), every_steps=every_steps)
    with pytest.raises(KeyboardInterrupt):
        regrow.recover(model, masks, train, val, callbacks=[_Interrupt()], checkpoint=saves, **kw)

    model, masks, train, val = _setup()  # a new process would build everything again
    STOP_AT[0] = -1
    saves = Checkpoints(tmp_path / "ck", identity("cfg"), every_steps=every_steps)
    result = regrow.recover(model, masks, train, val, callbacks=[_Interrupt()], checkpoint=saves, **kw)
    assert [h.val_loss for h in result.history] == [h.val_loss for h in reference.history]
    assert result.details["dynamic"] == reference.details["dynamic"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_an_ended_phase_hands_back_its_end_state_without_training(tmp_path, monkeypatch):
    model, masks, train, val = _setup()
    saves = Checkpoints(tmp_path / "ck", identity("cfg"))
    first = regrow.recover(model, masks, train, val, method="finetune", epochs=2, progress=False, checkpoint=saves)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["phases"] == [
        {"index": 0, "label": "finetune, 2 epochs, lr 0.001", "done": True, "epoch": 2, "epochs": 2, "step": 16}
    ]

    model, masks, train, val = _setup()
    monkeypatch.setattr("regrow.recovery.loop._step", lambda *a: pytest.fail("an ended phase trained again"))
    saves = Checkpoints(tmp_path / "ck", identity("cfg"))
    again = regrow.recover(model, masks, train, val, method="finetune", epochs=2, progress=False, checkpoint=saves)
    assert [h.val_accuracy for h in again.history] == [h.val_accuracy for h in first.history]
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())
    # another phase (another method or length) at the same place is refused, not trained from a wrong state
    model, masks, train, val = _setup()
    with pytest.raises(
        RegrowError, match="is of phase 'finetune, 2 epochs, lr 0.001', but this run's phase 1 is 'finetune, 3"
    ):
        regrow.recover(
            model,
            masks,
            train,
            val,
            method="finetune",
            epochs=3,
            progress=False,
            checkpoint=Checkpoints(tmp_path / "ck", identity("cfg")),
        )


def test_every_generator_is_put_back():
    gen = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.arange(8.0)), shuffle=True, generator=gen)
    assert generators(loader, loader, [1, 2]) == [gen]
    state = rng_state(generators(loader))
    drawn = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    set_rng_state(state, generators(loader))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item()) == drawn


def test_a_callback_whose_state_is_not_plain_data_is_named():
    class Holder:
        def __init__(self):
            self.count = 3
            self.lock = object()

    with pytest.raises(RegrowError, match=r"callback Holder cannot be checkpointed: Holder.lock \(object\)"):
        callback_state(Holder())


def _interrupted_run(out, monkeypatch, overrides=BUDGET):
    """A run stopped by Ctrl-C when recovery starts: the baseline training's checkpoint stays in ``out``."""
    with monkeypatch.context() as m:
        m.setattr("regrow.pipeline.recover.recover", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            regrow.run("demo", overrides=overrides, out_dir=out, progress=False)
    (stage,) = out.glob(".regrow-partial-*")
    return stage / ".regrow-checkpoint"


def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    reference = regrow.run("demo", overrides=BUDGET, out_dir=tmp_path / "ref", progress=False)
    _interrupted_run(tmp_path / "o", monkeypatch)
    from regrow.recovery import loop

    steps, step = [], loop._step
    monkeypatch.setattr(loop, "_step", lambda *a: steps.append(1) or step(*a))
    resumed = regrow.run("demo", overrides=BUDGET, out_dir=tmp_path / "o", progress=False, resume=True)
    assert len(steps) == resumed.recovery["steps"]  # recovery's steps only: the baseline was not trained again
    pick = lambda r: {k: (v.accuracy, v.loss) for k, v in r.snapshots.items()}  # noqa: E731
    assert pick(resumed) == pick(reference)
    assert resumed.recovery["history"] == [
        dict(h, seconds=r["seconds"]) for h, r in zip(reference.recovery["history"], resumed.recovery["history"])
    ]
    assert not list((tmp_path / "o").glob(".regrow-*"))  # checkpoint and staging folder gone once published


def test_a_resume_with_another_recipe_or_other_code_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    _interrupted_run(out, monkeypatch)
    with pytest.raises(
        RegrowError,
        match=r"another recipe \(resolved config, checkpoint -> now: prune.sparsity: 0.9 -> 0.8\)",
    ):
        regrow.run("demo", overrides=[*BUDGET, "prune.sparsity=0.8"], out_dir=out, progress=False, resume=True)
    monkeypatch.setattr(checkpoint, "code_digest", lambda: "0123456789abcdef")
    with pytest.raises(RegrowError, match=r"written by regrow .* and this is regrow .*code 0123456789abcdef"):
        regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, resume=True)
    monkeypatch.undo()
    # the checkpoint settings may differ: they do not change the numbers
    args = ["run", "demo", "--out", str(out), "--no-progress", "--resume", *[a for s in BUDGET for a in ("--set", s)]]
    assert main([*args, "--set", "prune.sparsity=0.8"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert main([*args, "--set", "checkpoint.every_steps=5"]) == 0


def test_resume_needs_out_and_something_to_resume(tmp_path, capsys):
    with pytest.raises(RegrowError, match="--resume continues the run whose checkpoint is in --out DIR"):
        regrow.run("demo", overrides=BUDGET, progress=False, resume=True)
    out = tmp_path / "o"
    regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, resume=True)  # nothing there: a fresh run
    with pytest.raises(RegrowError, match="nothing to resume: .* holds a finished run and no checkpoint"):
        regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, resume=True)


def test_a_corrupt_checkpoint_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "o"
    folder = _interrupted_run(out, monkeypatch)
    (folder / "phase-0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        RegrowError, match=r"checkpoint file .*phase-0.pt' cannot be read .*start over with --overwrite"
    ):
        regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, resume=True)
    assert not list(out.glob(".regrow-partial-*"))  # a checkpoint that cannot be read is of no use: gone
    regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, overwrite=True)
    assert (out / "report.json").is_file()


def test_overwrite_starts_over_and_deletes_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "o"
    folder = _interrupted_run(out, monkeypatch)
    regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, overwrite=True)
    assert not folder.exists()
    shutil.rmtree(out)


def test_a_run_published_over_an_earlier_one_leaves_no_checkpoint(tmp_path):
    out = tmp_path / "o"
    regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False)
    regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, overwrite=True)  # published as a version
    assert (out / ".regrow-runs").is_dir() and not list(out.rglob(".regrow-checkpoint"))


def test_a_failed_publication_keeps_the_checkpoint_and_resume_publishes(tmp_path, monkeypatch):
    out = tmp_path / "o"

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("regrow.publish._publish_fresh", full)
        with pytest.raises(RegrowError, match="could not be published .*No space left on device"):
            regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False)
    assert list(out.glob(".regrow-partial-*/.regrow-checkpoint/state.json"))  # the training is not lost
    from regrow.recovery import loop

    monkeypatch.setattr(loop, "_step", lambda *a: pytest.fail("every phase had ended: nothing to train again"))
    regrow.run("demo", overrides=BUDGET, out_dir=out, progress=False, resume=True)
    assert (out / "report.json").is_file() and not list(out.glob(".regrow-*"))


def test_resume_with_checkpoints_off_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "o"
    _interrupted_run(out, monkeypatch)
    with pytest.raises(RegrowError, match="--resume reads the run's checkpoint, and checkpoint.enabled is false"):
        regrow.run("demo", overrides=[*BUDGET, "checkpoint.enabled=false"], out_dir=out, progress=False, resume=True)
    assert list(out.glob(".regrow-partial-*/.regrow-checkpoint/state.json"))  # refused before anything: kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recovery_on_cuda_resumes_to_the_same_weights(tmp_path):
    """Checkpoints are read onto the CPU; the masks, the kept copy and the rollback state go back to the GPU."""
    kw = dict(method="rigl", epochs=3, patience=None, ema=0.9, progress=False, dynamic={"update_every": 4})

    def on_cuda():
        model, masks, train, val = _setup()
        model.cuda()
        return model, masks, train, val

    model, masks, train, val = on_cuda()
    STOP_AT[0] = -1
    regrow.recover(model, masks, train, val, callbacks=[_Interrupt()], **kw)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model, masks, train, val = on_cuda()
    STOP_AT[0] = 13
    with pytest.raises(KeyboardInterrupt):
        saves = Checkpoints(tmp_path / "ck", identity("cfg"), every_steps=3)
        regrow.recover(model, masks, train, val, callbacks=[_Interrupt()], checkpoint=saves, **kw)
    model, masks, train, val = on_cuda()
    STOP_AT[0] = -1
    saves = Checkpoints(tmp_path / "ck", identity("cfg"), every_steps=3)
    regrow.recover(model, masks, train, val, callbacks=[_Interrupt()], checkpoint=saves, **kw)
    for name, value in model.state_dict().items():  # the same kernels in one process: equal to the last bit
        assert torch.equal(value, expected[name]), name
