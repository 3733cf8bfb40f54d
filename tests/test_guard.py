"""The divergence guard, the baseline and export checks, and every batch checked once: each numerical fault the
issue tried (a NaN pixel, a NaN input, lr 1e3 in baseline training and in recovery) is caught, said and never
exported."""

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import regrow
from conftest import TinyMLP, make_batches
from regrow.cli import main
from regrow.errors import RegrowError
from regrow.masks import MaskSet
from regrow.recovery.guard import WINDOW, Diverged, Guard, judge
from regrow.recovery.loop import EpochRecord, _keep_best

QUICK = ["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"]
THREE = ["model.train.epochs=3", "recover.epochs=3", "evaluate.latency=false"]  # warm-up long enough to survive lr 1
LN10 = math.log(10)


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_error_line(err):
    """The one error line, last on stderr (after the run's warnings, such as the guard's rollbacks)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("regrow: error: ")]
    assert errors == lines[-1:] and "Traceback" not in err, err
    return errors[0]


def all_finite_files(folder):
    for name in ("model.safetensors", "masks.safetensors"):
        for key, value in load_file(str(folder / name)).items():
            assert value.dtype == torch.bool or torch.isfinite(value).all(), f"{name}: {key}"


# --- the explode rule on hand-made losses ---------------------------------------------------------------------


def test_explode_rule_on_a_hand_made_loss_sequence():
    # reference = max(median of the accepted window, ln(classes)); divergence above 10 x the reference
    assert judge(1e9, [], 10, 10.0) is None  # the first step has no reference: only finiteness
    assert judge(10 * LN10 - 1e-9, [0.01] * WINDOW, 10, 10.0) is None  # tiny losses: the floor ln 10 rules
    assert judge(1.19, [0.018] * WINDOW, 10, 10.0) is None  # the ResNet spike of the shipped recipes (65 x median)
    assert "above 10 x the reference 2.303" in judge(10 * LN10 + 1e-9, [0.01] * WINDOW, 10, 10.0)
    assert judge(42.9, [4.3] * WINDOW, 10, 10.0) is None  # above the floor, the median rules
    assert "above 10 x the reference 4.3 " in judge(43.1, [4.3] * WINDOW, 10, 10.0)
    assert judge(43.1, [4.3] * 19 + [100.0] * 21, 10, 10.0) is None  # the median of the window, not the mean
    assert judge(float("nan"), [], 10, 10.0) == "the training loss was nan"
    assert judge(float("inf"), [1.0], 10, None) == "the training loss was inf"
    assert judge(1e30, [1.0], 10, None) is None  # explode_factor None: only non-finite losses diverge
    assert judge(2.1, [0.2], 1, 10.0) is not None  # one output: no floor (ln 1 = 0)


def test_guard_judges_steps_in_order_and_keeps_only_accepted_losses():
    guard = Guard(SimpleNamespace(explode_factor=10.0, retries=3, lr_factor=0.5), torch.device("cpu"))
    guard.start_epoch(1)
    logits = torch.zeros(4, 10)
    sequence = [2.3, 2.0, 1.5, 1.2, 1.0, 0.9, 30.0]  # 30 > 10 x max(median 1.35, ln 10 = 2.303) = 23.03
    accepted = [guard.watch(torch.tensor(loss), logits, step, 1e-3) for step, loss in enumerate(sequence, 1)]
    assert accepted == [True] * 6 + [False]
    assert guard.tripped["batch"] == 6 and guard.tripped["step"] == 7 and guard.tripped["epoch"] == 1
    assert list(guard.window) == pytest.approx(sequence[:6])
    assert statistics.median(guard.window) == pytest.approx(1.35)


def test_off_the_cpu_losses_are_read_in_groups_with_the_same_verdict():
    guard = Guard(SimpleNamespace(explode_factor=10.0, retries=3, lr_factor=0.5), torch.device("meta"))
    assert guard.every == 50
    guard.start_epoch(2)
    for step, loss in enumerate([2.0, 2.1, float("nan"), 1.0], 1):
        assert guard.watch(torch.tensor(loss), torch.zeros(1, 3), step, 0.1)  # nothing read yet
    guard.flush()  # the epoch's end reads the rest
    assert guard.tripped["batch"] == 2 and guard.tripped["cause"] == "the training loss was nan"
    assert list(guard.window) == pytest.approx([2.0, 2.1])


# --- the best-epoch rule --------------------------------------------------------------------------------------


def record(epoch, accuracy, val_loss, train_loss=0.5):
    return EpochRecord(epoch, 1e-3, train_loss, 0.9, val_loss, accuracy, 0.0, 1.0)


def test_best_epoch_rule_never_keeps_an_epoch_with_a_non_finite_loss():
    run = SimpleNamespace(model=nn.Linear(2, 2), masks=MaskSet({}))
    best, better = _keep_best(run, None, record(0, 0.50, 1.0, None), True)
    assert better and best.epoch == 0
    for bad in (record(1, 0.99, float("nan")), record(2, 0.99, 0.1, float("inf")), record(3, 0.99, float("-inf"))):
        best, better = _keep_best(run, best, bad, True)
        assert not better and best.epoch == 0  # a higher accuracy does not make up for a broken loss
    best, better = _keep_best(run, best, record(4, 0.60, 0.9), True)
    assert better and best.epoch == 4


# --- the loop: rollback, retry at a lower learning rate, stop --------------------------------------------------


class PoisonOnce:
    """Sets a weight to NaN after global step ``at``, once per test (a class attribute survives rollbacks)."""

    fired = 0

    def __init__(self, at, times=1):
        self.at, self.times = at, times
        PoisonOnce.fired = 0

    def on_train_start(self, state):
        pass

    def checkpoint_ready(self, state):
        return True

    def on_step_end(self, state):
        if state.step == self.at and PoisonOnce.fired < self.times:
            PoisonOnce.fired += 1
            with torch.no_grad():
                state.model.fc1.weight[0, 0] = float("nan")


def recover_tiny(callback, epochs=3, **kwargs):
    torch.manual_seed(0)
    model = TinyMLP()
    masks = regrow.prune(model, 0.5)
    result = regrow.recover(
        model, masks, make_batches(6), make_batches(2, seed=1), method="finetune", epochs=epochs, lr=0.01,
        patience=None, progress=False, callbacks=[callback], **kwargs,
    )  # fmt: skip
    return model, masks, result


def test_a_nan_step_rolls_the_epoch_back_lowers_the_lr_and_recovery_goes_on():
    model, masks, result = recover_tiny(PoisonOnce(at=8))  # epoch 2, its 2nd step; the 3rd step's loss is NaN
    (event,) = result.details["guard"]["rollbacks"]
    assert (event["epoch"], event["step"], event["batch"]) == (2, 9, 2)
    assert event["cause"] == "the training loss was nan"
    assert event["lr_after"] == pytest.approx(event["lr_before"] * 0.5) and event["lr_scale"] == 0.5
    assert [h.epoch for h in result.history] == [0, 1, 2, 3] and result.steps == 18  # epoch 2 ran again, whole
    _, _, clean = recover_tiny(PoisonOnce(at=10**9))
    same = [{**vars(h), "seconds": 0} for h in (result.history[1], clean.history[1])]
    assert same[0] == same[1]  # the epoch before the rollback is the clean run's, bit for bit
    assert result.history[2].lr == pytest.approx(0.5 * clean.history[2].lr)  # the schedule, halved from then on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for fqn, mask in masks.items():
        assert torch.count_nonzero(model.get_parameter(fqn)[~mask]) == 0


def test_divergence_beyond_the_retries_stops_with_one_paragraph():
    with pytest.raises(Diverged) as caught:
        recover_tiny(PoisonOnce(at=8, times=10), guard={"retries": 2})
    message = str(caught.value)
    assert message.startswith("recovery diverged at epoch 2, step 9 (batch 2 of the epoch, counting from 0)")
    assert "rolled back to the start of its epoch 2 times before" in message and "x0.25" in message
    assert "recover.lr" in message and "\n" not in message
    with pytest.raises(Diverged, match="no retry left"):
        recover_tiny(PoisonOnce(at=8), guard={"retries": 0})


class PoisonValidationOnce(PoisonOnce):
    """Breaks only what validation uses: a BatchNorm's running variance (training uses batch statistics)."""

    def on_step_end(self, state):
        if state.step == self.at and PoisonOnce.fired < self.times:
            PoisonOnce.fired += 1
            state.model[1].running_var.fill_(float("nan"))


def test_a_non_finite_validation_loss_rolls_the_epoch_back_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    result = regrow.recover(
        model, MaskSet({}), make_batches(6), make_batches(2, seed=1), method="finetune", epochs=2, lr=0.01,
        patience=None, progress=False, callbacks=[PoisonValidationOnce(at=3)],
    )  # fmt: skip
    (event,) = result.details["guard"]["rollbacks"]
    assert event["epoch"] == 1 and event["step"] is None
    assert event["cause"] == "the validation loss after the epoch was nan"
    assert all(math.isfinite(h.val_loss) for h in result.history)
    assert torch.isfinite(model[1].running_var).all()


def test_a_model_that_validates_to_nan_as_it_came_in_is_refused():
    model = TinyMLP()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(RegrowError, match="validation loss of the model as it came in is nan"):
        regrow.recover(model, MaskSet({}), make_batches(2), make_batches(1, seed=1), method="finetune", progress=False)


# --- whole runs: the faults ----------------------------------------------------------------------------

DATA = """
import torch
import regrow

def digits_nan():  # one NaN pixel in 1 of the 1,221 training images
    bundle = regrow.data.DATASETS.get("digits")()
    bundle.train.dataset.tensors[0][700, 0, 3, 4] = float("nan")
    return bundle

def model():
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

def batches(n=5, edit=None):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(8, 4, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        out.append(edit(i, x, y) if edit else (x, y))
    return out

def nan_input():  # synthetic data, a NaN in the 4th test batch
    def edit(i, x, y):
        if i == 3:
            x[2, 1] = float("nan")
        return x, y
    return {"train": batches(), "test": batches(edit=edit)}

def late_label():
    return {"train": batches(edit=lambda i, x, y: (x, y + 2 * (i == 2))), "test": batches()}

def late_shape():
    return {"train": batches(), "test": batches(edit=lambda i, x, y: (x[:, :3] if i == 3 else x, y))}

def late_count():
    return {"train": batches(), "val": batches(edit=lambda i, x, y: (x, y[:7] if i == 1 else y)), "test": batches()}
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "guarddata.py").write_text(DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def synthetic_recipe(folder, data):
    recipe = folder / f"{data}.yaml"
    recipe.write_text(
        f"name: {data}\nmodel: {{factory: 'guarddata:model', train: {{epochs: 1}}}}\n"
        f"data: {{factory: 'guarddata:{data}'}}\nprune: {{sparsity: 0.5}}\nrecover: {{epochs: 1}}\n"
        "evaluate: {latency: false}\n"
    )
    return recipe


def test_a_nan_pixel_in_one_training_image_is_refused_naming_the_batch_before_anything_is_written(factories):
    import guarddata

    train = guarddata.digits_nan().train  # the loader's first pass: the order the check reads it in
    index = next(i for i, (x, _) in enumerate(train) if torch.isnan(x).any())
    recipe = factories / "r.yaml"
    recipe.write_text(
        "name: r\nmodel: {name: digits_cnn, kwargs: {width: 8}, train: {epochs: 1}}\n"
        "data: {factory: 'guarddata:digits_nan'}\nprune: {sparsity: 0.9}\nrecover: {epochs: 1}\n"
        "evaluate: {latency: false}\n"
    )
    out = factories / "out"
    with pytest.raises(RegrowError) as caught:
        regrow.run(str(recipe), out_dir=out, progress=False)
    assert str(caught.value) == (
        f"batch {index} of the train data (counting from 0) has 1 NaN and 0 inf values in inputs; regrow cannot "
        "train or measure on them: fix the data."
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "data, message",
    [
        ("nan_input", "batch 3 of the test data (counting from 0) has 1 NaN and 0 inf values in inputs"),
        ("late_label", "batch 2 of the train data (counting from 0) has a label 3 outside the model's 3 outputs"),
        ("late_shape", "the model cannot run on batch 3 of the test data (counting from 0) (RuntimeError: mat1"),
        ("late_count", "batch 1 of the validation data (counting from 0) has 8 inputs but 7 labels"),
    ],
)
def test_every_batch_is_checked_before_anything_is_trained_or_written(capsys, factories, data, message):
    out = factories / "out"
    code, err = run_cli(capsys, "-q", "run", str(synthetic_recipe(factories, data)), "--out", str(out))
    assert code == 2 and message in one_error_line(err)
    assert not out.exists()


def test_lr_1000_in_recovery_stops_cleanly_and_exports_nothing(capsys, tmp_path):
    out = tmp_path / "o"
    code, err = run_cli(capsys, "-q", "run", "demo", *[a for o in [*QUICK, "recover.lr=1000"] for a in ("--set", o)],
                        "--out", str(out))  # fmt: skip
    line = one_error_line(err)
    assert code == 2 and "recovery diverged at epoch 1, step 2" in line and "above 10 x the reference" in line
    assert "rolled back to the start of its epoch 3 times before" in line and "Nothing was exported" in line
    assert not out.exists()


def test_lr_1_in_recovery_is_rolled_back_then_recovers_and_the_report_says_so(tmp_path):
    out = tmp_path / "o"
    report = regrow.run("demo", overrides=[*THREE, "recover.lr=1"], out_dir=out, progress=False)
    rollbacks = report.recovery["details"]["guard"]["rollbacks"]
    assert [(e["epoch"], e["step"], e["lr_scale"]) for e in rollbacks] == [(1, 2, 0.5), (1, 2, 0.25), (1, 2, 0.125)]
    assert json.loads((out / "report.json").read_text())["recovery"]["details"]["guard"]["rollbacks"] == rollbacks
    md = (out / "report.md").read_text()
    assert "## Divergence guard" in md and "Rollbacks: 3." in md
    assert "- recovery, epoch 1, step 2 (batch 1): the training loss" in md and "the schedule x0.125" in md
    all_finite_files(out)


def test_lr_1000_in_baseline_training_is_refused_before_pruning(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RegrowError) as caught:
        regrow.run("demo", overrides=[*QUICK, "model.train.lr=1000"], out_dir=out, progress=False)
    message = str(caught.value)
    assert message.startswith("baseline training (model.train) diverged at epoch 1, step 2")
    assert "model.train.lr (now 1000" in message
    assert not out.exists()


def test_a_baseline_trained_to_chance_level_is_refused_before_pruning(tmp_path):
    # lr 1: the guard rolls baseline training back 3 times; at lr x0.125 it no longer explodes, but learns nothing
    with pytest.raises(RegrowError) as caught:
        regrow.run("demo", overrides=[*THREE, "model.train.lr=1"], out_dir=tmp_path / "o", progress=False)
    assert str(caught.value).startswith(
        "the baseline's test accuracy, 10.28%, is at chance level for 10 classes (at most 14.74%: 1/10 plus 3 standard "
        "errors of guessing on 360 samples) after baseline training (model.train: 3 epochs at lr 1, rolled back 3 "
        "times by the divergence guard), which handed back the untrained model: none of its epochs beat it on "
        "validation (validation loss untrained 2.3041, after the last epoch 2.3063)"
    )
    assert not (tmp_path / "o").exists()


def test_an_under_trained_baseline_at_chance_level_goes_on_with_a_note(tmp_path):
    # one epoch of the ViT lowers the validation loss (2.576 -> 2.300), not yet the test accuracy (11.11%)
    report = regrow.run("digits_vit_heads", overrides=QUICK, out_dir=tmp_path / "o", progress=False)
    (note,) = [n for n in report.notes if n.startswith("The baseline is under-trained")]
    assert "lowered the validation loss from 2.5760 to 2.2998 but not yet the accuracy" in note


def test_an_untrained_model_pruned_on_purpose_is_accepted_with_a_note_but_a_checkpoint_at_chance_is_not(tmp_path):
    overrides = ["recover.epochs=1", "evaluate.latency=false"]
    report = regrow.run("digits_set_scratch", overrides=overrides, out_dir=tmp_path / "scratch", progress=False)
    assert any(n.startswith("The baseline is an untrained model") for n in report.notes)
    assert "The baseline is an untrained model" in (tmp_path / "scratch" / "report.md").read_text()
    torch.manual_seed(0)
    untrained = regrow.models.MODELS.get("mlp")(in_features=64, hidden=256, depth=2)
    save_file({k: v.contiguous() for k, v in untrained.state_dict().items()}, str(tmp_path / "init.safetensors"))
    with pytest.raises(RegrowError, match="with the weights of model.checkpoint .* do not fit this data"):
        regrow.run(
            "digits_set_scratch", overrides=[*overrides, f"model.checkpoint={tmp_path / 'init.safetensors'}"],
            out_dir=tmp_path / "ckpt", progress=False,
        )  # fmt: skip
    assert not (tmp_path / "ckpt").exists()


def test_a_model_with_non_finite_weights_is_never_exported():
    from regrow.pipeline.export import check_finite

    model = TinyMLP()
    check_finite(model, {})
    with torch.no_grad():
        model.fc2.weight[1, 1] = float("inf")
    with pytest.raises(RegrowError, match=r"NaN or inf values in 1 of its 6 floating-point tensors \(fc2.weight\)"):
        check_finite(model, {})
    with pytest.raises(RegrowError, match=r"fc1.weight \(shared codebook\)"):
        check_finite(TinyMLP(), {"fc1.weight": torch.tensor([0.5, float("nan")])})


def test_a_later_batch_of_new_input_sizes_the_model_cannot_take_is_named():
    from regrow.batches import check_batches
    from regrow.errors import RegrowError

    model = nn.Linear(16, 3)
    labels = torch.zeros(4, dtype=torch.long)
    data = [(torch.randn(4, 16), labels), (torch.randn(4, 16), labels), (torch.randn(4, 12), labels)]
    with pytest.raises(RegrowError, match=r"cannot run on batch 2 of the train data \(counting from 0\) \(Runtime"):
        check_batches(model, data, "train", classes=3)
    check_batches(model, data[:2], "train", classes=3)  # the same sizes throughout: no error
