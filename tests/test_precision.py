"""How recovery computes: autocast precision, loss scaling, channels-last, torch.compile, metrics on the device.

All of it runs on the CPU here (bf16 and fp16 autocast and GradScaler("cpu") work there); the CUDA-only
parts (side-stream copies, channels-last "auto") have tests that skip without a GPU.
"""

import copy
import math
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regrow
from conftest import TinyCNN, TinyMLP
from regrow.config import RecoverConfig, explain
from regrow.errors import RegrowError
from regrow.masks import MaskEnforcer
from regrow.objectives import as_scored
from regrow.recovery import compute as compute_mod
from regrow.recovery.compute import Compute, DeviceTally, convolutional, on_device
from regrow.recovery.loop import masked_step
from regrow.recovery.methods import TaskLoss

PRECISIONS = ["fp32", "bf16", "fp16"]


def linear_task(n_batches, seed, batch=32):
    """Batches labelled by one fixed linear map (train and validation agree on it)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(98))
    return [(x, (x @ w).argmax(1)) for x in (torch.randn(batch, 8, generator=g) for _ in range(n_batches))]


def image_task(n_batches, seed, batch=16):
    """8x8 grey images whose class is where a bright 4x4 patch sits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (batch,), generator=g)
        x = torch.randn(batch, 1, 8, 8, generator=g)
        for i, c in enumerate(y.tolist()):
            r, k = [(0, 0), (0, 4), (4, 2)][c]
            x[i, 0, r : r + 4, k : k + 4] += 1.0
        out.append((x, y))
    return out


def trained_mlp():
    torch.manual_seed(0)
    model = TinyMLP()
    regrow.recover(
        model, regrow.MaskSet({}), linear_task(12, 0), linear_task(4, 1), method="finetune", epochs=6, lr=0.02,
        patience=None, progress=False,
    )  # fmt: skip
    return model


def masked_zero(model, masks):
    return all(torch.count_nonzero(model.get_parameter(f)[~m]) == 0 for f, m in masks.items())


class EveryStep:
    """After every step: pruned weights exactly zero, their optimizer state too; records the layouts seen."""

    def __init__(self):
        self.steps = 0
        self.layouts = set()

    def on_train_start(self, state):
        pass

    def checkpoint_ready(self, state):
        return True

    def on_step_end(self, state):
        self.steps += 1
        assert masked_zero(state.model, state.masks), f"a pruned weight moved at step {state.step}"
        for fqn, mask in state.masks.items():
            p = state.model.get_parameter(fqn)
            nhwc, nchw = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
            if p.dim() == 4 and nhwc != nchw:  # (one input channel: both layouts at once)
                self.layouts.add("nhwc" if nhwc else "nchw")
            for value in state.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    assert torch.count_nonzero(value[~mask]) == 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_recovers_and_keeps_the_masks_exact(precision):
    model = trained_mlp()
    masks = regrow.prune(model, 0.8)
    check = EveryStep()
    result = regrow.recover(
        model, masks, linear_task(12, 0), linear_task(4, 1), method="distill", epochs=4, lr=0.01,
        precision=precision, patience=None, callbacks=[check], progress=False,
    )  # fmt: skip
    assert check.steps == 48
    assert result.best_val_accuracy > result.history[0].val_accuracy
    losses = [h.train_loss for h in result.history[1:]]
    assert losses[-1] < losses[0]
    assert masked_zero(model, masks)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts the weights
    compute = result.details["compute"]
    assert compute["precision"] == precision and compute["weights"] == "float32"
    assert ("skipped_steps" in compute) == (precision == "fp16")  # fp16 alone has a loss scaler


class Recording(nn.Module):
    """Wraps a model and records, per forward call, the autocast dtype (None: off), grad and inference mode."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x):
        on = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if on else None
        self.calls.append((dtype, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), self.training))
        return self.inner(x)


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_student_and_teacher_run_in_the_precision_and_the_teacher_under_inference_mode(precision, dtype):
    base = trained_mlp()
    teacher = Recording(copy.deepcopy(base))
    student = Recording(base)
    masks = regrow.prune(student, 0.5, keep_dense=False)
    regrow.recover(
        student, masks, linear_task(3, 0), linear_task(1, 1), method="distill", teacher=teacher, epochs=1,
        precision=precision, progress=False,
    )  # fmt: skip
    training = [c for c in student.calls if c[3]]
    validating = [c for c in student.calls if not c[3]]
    assert training and all(c == (dtype, True, False, True) for c in training)
    assert validating and all(c[0] == dtype and not c[1] for c in validating)  # validation: same precision
    assert len(teacher.calls) == len(training)
    assert all(c == (dtype, False, True, False) for c in teacher.calls)  # eval mode, inference_mode, precision


def test_feature_distillation_runs_its_teacher_under_inference_mode_too():
    torch.manual_seed(0)
    model = TinyCNN()
    masks = regrow.prune(model, 0.5)
    result = regrow.recover(
        model, masks, image_task(4, 0), image_task(2, 1), method="transfer", epochs=2, precision="bf16",
        progress=False,
    )  # fmt: skip
    assert result.history[-1].parts["feature_loss"] >= 0.0
    assert masked_zero(model, masks)


def fp16_setup():
    torch.manual_seed(0)
    model = TinyMLP()
    masks = regrow.prune(model, 0.6, keep_dense=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    options = SimpleNamespace(precision="fp16", channels_last=False, compile=False)
    compute = Compute.settle(options, model, torch.device("cpu"))
    return model, masks, optimizer, MaskEnforcer(masks, model), compute


class Scaled:
    """The task loss times ``factor``: large enough, its fp16 gradients overflow."""

    def __init__(self, factor):
        self.task = TaskLoss(SimpleNamespace(label_smoothing=0.0))
        self.factor = factor

    def losses(self, model, inputs, targets):
        out, logits = self.task.losses(model, inputs, targets)
        out["loss"] = out["loss"] * self.factor
        return out, logits


def test_fp16_skips_a_step_whose_gradients_overflow_and_the_masks_hold():
    model, masks, optimizer, enforcer, compute = fp16_setup()
    x, y = linear_task(1, 0)[0]
    assert compute.scaler is not None
    before = copy.deepcopy(model.state_dict())
    scale = compute.scaler.get_scale()
    masked_step(model, Scaled(1e30), optimizer, enforcer, x, y, compute=compute)
    assert compute.skipped_steps == 1 and compute.scaler.get_scale() == scale / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing moved
    assert not optimizer.state  # no optimizer state was built by the skipped step
    for _ in range(3):
        masked_step(model, Scaled(1.0), optimizer, enforcer, x, y, compute=compute)
    assert compute.skipped_steps == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert masked_zero(model, masks)
    for fqn, mask in masks.items():
        for value in optimizer.state[model.get_parameter(fqn)].values():
            if value.shape == mask.shape:
                assert torch.count_nonzero(value[~mask]) == 0


def test_fp16_callbacks_and_masks_see_unscaled_gradients():
    """The scaler unscales right after the backward pass: an fp16 step's gradients match fp32's closely."""
    model, masks, optimizer, enforcer, compute = fp16_setup()
    x, y = linear_task(1, 0)[0]
    reference = copy.deepcopy(model)
    seen = {}
    masked_step(
        model, Scaled(1.0), optimizer, enforcer, x, y, compute=compute,
        after_backward=[lambda: seen.update(g=model.fc1.weight.grad.clone())],
    )  # fmt: skip
    F.cross_entropy(reference(x), y).backward()
    assert torch.allclose(seen["g"], reference.fc1.weight.grad, rtol=0.05, atol=1e-3)


def test_a_nan_batch_is_refused_in_every_precision_before_it_reaches_the_weights():
    """The divergence guard checks the first epoch's inputs: a NaN batch stops recovery with the batch named,
    in fp32 (which used to train on it) as in fp16 (whose scaler used to skip it); the scaler still skips
    steps whose gradients overflow (test_fp16_skips_a_step_whose_gradients_overflow_and_the_masks_hold)."""
    for precision in ("fp32", "fp16"):
        torch.manual_seed(0)
        model = TinyMLP()
        masks = regrow.prune(model, 0.5, keep_dense=False)
        before = copy.deepcopy(model.state_dict())
        train = linear_task(4, 0)
        train[2] = (torch.full_like(train[2][0], float("nan")), train[2][1])
        with pytest.raises(RegrowError, match="training batch 2 .* has non-finite inputs"):
            regrow.recover(
                model, masks, train, linear_task(1, 1), method="finetune", epochs=1, precision=precision,
                patience=None, progress=False, callbacks=[probe := _Finite()],
            )  # fmt: skip
        assert probe.finite  # the two steps before the NaN batch kept the weights finite
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _Finite:
    finite = True

    def on_train_start(self, state):
        pass

    def checkpoint_ready(self, state):
        return True

    def on_step_end(self, state):
        self.finite = self.finite and all(torch.isfinite(p).all() for p in state.model.parameters())


def test_fp16_refuses_weights_that_are_fp16_already():
    model = TinyMLP().half()
    with pytest.raises(RegrowError, match="float16 already"):
        options = SimpleNamespace(precision="fp16", channels_last=False, compile=False)
        Compute.settle(options, model, torch.device("cpu"))
    with pytest.raises(RegrowError, match="float16 already"):
        regrow.recover(model, regrow.MaskSet({}), linear_task(1, 0), linear_task(1, 1), precision="fp16")


def test_channels_last_trains_in_nhwc_and_hands_model_and_teacher_back_in_their_layout():
    torch.manual_seed(0)
    model = TinyCNN()
    train, val = image_task(6, 0), image_task(2, 1)
    regrow.recover(model, regrow.MaskSet({}), train, val, method="finetune", epochs=2, progress=False)
    twin = copy.deepcopy(model)
    results = {}
    for layout, m in (("nchw", twin), ("nhwc", model)):
        masks = regrow.prune(m, 0.6)
        teacher = masks.dense
        check = EveryStep()
        results[layout] = regrow.recover(
            m, masks, train, val, method="distill", epochs=2, channels_last=layout == "nhwc", patience=None,
            callbacks=[check], progress=False,
        )  # fmt: skip
        assert check.layouts == {layout}  # the 4-D targets trained in that layout
        assert all(t.is_contiguous() for t in (*m.parameters(), *teacher.parameters()))  # handed back NCHW
        assert masked_zero(m, masks)
    a, b = results["nchw"], results["nhwc"]
    assert a.details["compute"]["channels_last"] is False and b.details["compute"]["channels_last"] is True
    for ha, hb in zip(a.history, b.history, strict=True):  # same values, other summation order at most
        assert hb.val_loss == pytest.approx(ha.val_loss, rel=1e-4, abs=1e-6)
    for (ka, va), (kb, vb) in zip(twin.state_dict().items(), model.state_dict().items(), strict=True):
        assert ka == kb and torch.allclose(va, vb, atol=1e-5)


def test_mask_multipliers_take_the_layout_of_their_weights():
    model = TinyCNN().to(memory_format=torch.channels_last)
    masks = regrow.prune(model, 0.5, keep_dense=False)
    enforcer = MaskEnforcer(masks, model)
    enforcer.weights()
    for p, f in zip(enforcer._params, enforcer._factors, strict=True):
        assert f.stride() == p.stride() and f.dtype == p.dtype
    assert masked_zero(model, masks)


def test_channels_last_auto_is_on_only_for_a_convolutional_model_on_cuda():
    from regrow.models import MODELS

    assert convolutional(MODELS.get("resnet")()) and convolutional(MODELS.get("digits_cnn")())
    assert not convolutional(MODELS.get("vit")()) and not convolutional(TinyMLP())
    options = SimpleNamespace(precision="fp32", channels_last="auto", compile=False)
    assert Compute.settle(options, MODELS.get("resnet")(), torch.device("cpu")).channels_last is False


def test_the_training_metrics_are_read_back_once_per_epoch(monkeypatch):
    reads = []
    original = DeviceTally.read

    def counting(self):
        reads.append(self.seen)
        return original(self)

    monkeypatch.setattr(DeviceTally, "read", counting)
    torch.manual_seed(0)
    model = TinyMLP()
    masks = regrow.prune(model, 0.5, keep_dense=False)
    regrow.recover(
        model, masks, linear_task(5, 0), linear_task(1, 1), method="finetune", epochs=3, patience=None, progress=False
    )
    assert reads == [160, 160, 160]  # epoch 0 has nothing to read


def test_the_progress_bar_reads_the_loss_at_most_once_per_refresh_interval():
    tally = DeviceTally()
    loss = {"loss": torch.tensor(0.5)}
    tally.add(loss, as_scored(torch.eye(3)[:2], torch.tensor([0, 2])))
    shown = []
    bar = SimpleNamespace(disable=False, mininterval=3600.0, set_postfix=lambda **kw: shown.append(kw["loss"]))
    for _ in range(5):
        tally.show(bar)
    assert shown == []
    bar.mininterval = 0.0
    tally.show(bar)
    assert shown == ["0.5000"]
    bar.disable = True
    tally.show(bar)
    assert len(shown) == 1


def test_device_sums_equal_python_float_sums_bit_for_bit():
    rng = random.Random(0)
    tally = DeviceTally()
    sums = {"loss": 0.0, "task_loss": 0.0}
    correct = 0
    for _ in range(200):
        n = rng.randint(1, 300)
        values = {k: torch.tensor(rng.uniform(0, 5) * 10 ** rng.randint(-6, 3)) for k in sums}
        logits, targets = torch.randn(n, 4), torch.randint(0, 4, (n,))
        tally.add(values, as_scored(logits, targets))
        for k, v in values.items():  # what the loop summed on the host before
            sums[k] += float(v) * n
        correct += int((logits.argmax(-1) == targets).sum())
    read_sums, read_correct, units = tally.read()
    assert read_sums == sums and read_correct == correct and units == tally.seen


def test_a_method_whose_loss_names_change_is_still_tallied():
    tally = DeviceTally()
    t = torch.tensor([0, 1])
    tally.add({"loss": torch.tensor(1.0)}, as_scored(torch.eye(2), t))
    tally.add({"loss": torch.tensor(3.0), "extra": torch.tensor(2.0)}, as_scored(torch.eye(2), t))
    assert tally.read() == ({"loss": 8.0, "extra": 4.0}, 4, 4)


def test_on_device_on_cpu_unpacks_and_passes_batches_through():
    batches = [(torch.ones(2, 3), torch.zeros(2, dtype=torch.long)), {"x": torch.ones(1), "labels": torch.ones(1)}]
    out = list(on_device(batches, torch.device("cpu")))
    assert out[0][0] is batches[0][0] and out[1] == ({"x": batches[1]["x"]}, batches[1]["labels"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_copies_one_batch_ahead_from_pinned_memory_on_cuda():
    device = torch.device("cuda")
    batches = [(torch.full((4, 3), float(i)), torch.full((4,), i)) for i in range(5)]
    out = [(x.clone(), y.clone()) for x, y in on_device(batches, device)]
    assert [x.device.type for x, _ in out] == ["cuda"] * 5
    assert all(torch.equal(x.cpu(), b[0]) and torch.equal(y.cpu(), b[1]) for (x, y), b in zip(out, batches))
    assert compute_mod._pinned(torch.ones(2)).is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_channels_last_recovery_on_cuda_keeps_masks_exact():
    from regrow.models import MODELS

    torch.manual_seed(0)
    model = MODELS.get("resnet")(width=8, num_classes=3).cuda()
    masks = regrow.prune(model, 0.7)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 3, (8,))) for _ in range(4)]
    result = regrow.recover(model, masks, data, data[:1], epochs=2, precision="bf16", progress=False)
    assert result.details["compute"] == {
        "precision": "bf16", "weights": "float32", "device": "cuda", "channels_last": True, "compile": False,
    }  # fmt: skip
    assert masked_zero(model, masks) and all(p.is_contiguous() for p in model.parameters())


def _compiler_missing() -> str | None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "torch.compile (inductor) needs a C compiler on the CPU; none found (cc, gcc)"
    return None


@pytest.mark.skipif(_compiler_missing() is not None, reason=str(_compiler_missing()))
def test_compile_trains_and_keeps_the_masks_exact():
    torch._dynamo.reset()
    model = trained_mlp()
    masks = regrow.prune(model, 0.8)
    check = EveryStep()
    result = regrow.recover(
        model, masks, linear_task(6, 0), linear_task(2, 1), method="distill", epochs=2, lr=0.01, compile=True,
        precision="bf16", patience=None, callbacks=[check], progress=False,
    )  # fmt: skip
    assert check.steps == 12 and masked_zero(model, masks)
    assert result.details["compute"]["compile"] is True
    assert type(model) is TinyMLP  # the caller's module, not the compiled wrapper
    assert not math.isnan(result.history[-1].train_loss)


def test_compile_with_transfer_is_refused():
    torch.manual_seed(0)
    model = TinyCNN()
    masks = regrow.prune(model, 0.5)
    with pytest.raises(RegrowError, match="compile=True does not apply to method 'transfer'"):
        regrow.recover(model, masks, image_task(2, 0), image_task(1, 1), method="transfer", compile=True)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("precision", "fp8", "'fp32', 'bf16' or 'fp16'"),
        ("precision", "float16", "'fp32', 'bf16' or 'fp16'"),
        ("channels_last", "sometimes", "allowed values: auto, false, true"),
        ("channels_last", 1, "allowed values: auto, false, true"),
        ("compile", "maybe", "'compile'"),
    ],
)
def test_bad_compute_options_name_the_allowed_values(key, value, message):
    with pytest.raises(Exception) as info:
        RecoverConfig(**{key: value})
    assert message in str(explain(info.value, "recovery options"))
    with pytest.raises(RegrowError, match=key):
        regrow.recover(TinyMLP(), regrow.MaskSet({}), linear_task(2, 0), linear_task(1, 1), **{key: value})


def test_compute_options_in_a_recipe():
    from regrow.config import validate

    base = {"model": {"name": "mlp"}, "data": {"name": "digits"}, "prune": {"sparsity": 0.5}}
    cfg = validate(base | {"recover": {"precision": "bf16", "channels_last": False, "compile": True}})
    assert (cfg.recover.precision, cfg.recover.channels_last, cfg.recover.compile) == ("bf16", False, True)
    defaults = validate(base).recover
    assert (defaults.precision, defaults.channels_last, defaults.compile) == ("fp32", "auto", False)


def test_the_report_states_the_precision():
    from regrow.report.markdown import _compute, _recovery

    fp32 = {"precision": "fp32", "weights": "float32", "device": "cpu", "channels_last": False, "compile": False}
    assert _compute(fp32) == "Precision: recovery trained and validated in float32 (no autocast) on cpu."
    fp16 = fp32 | {"precision": "fp16", "device": "cuda", "channels_last": True, "compile": True, "skipped_steps": 3}
    text = _compute(fp16)
    assert "with fp16 autocast on cuda, channels-last memory format and torch.compile" in text
    assert "skipped 3 steps whose gradients overflowed" in text and "measured without autocast" in text
    report = SimpleNamespace(
        recovery={"method": "distill", "epochs_run": 1, "details": {"compute": fp32 | {"precision": "bf16"}}},
        prune={},
        export={},
    )
    assert any(line.startswith("Precision: recovery trained and validated with bf16") for line in _recovery(report))
    old = SimpleNamespace(recovery={"method": "distill", "details": {}}, prune={}, export={})
    assert not any(line.startswith("Precision") for line in _recovery(old))  # reports from before say nothing


class _Fails:
    def on_train_start(self, state):
        raise RuntimeError("callback failed")


def test_the_model_gets_its_layout_back_when_recovery_fails():
    torch.manual_seed(0)
    model = TinyCNN()
    masks = regrow.prune(model, 0.5)
    with pytest.raises(RuntimeError, match="callback failed"):
        regrow.recover(model, masks, image_task(2, 0), image_task(1, 1), channels_last=True, callbacks=[_Fails()])
    assert all(p.is_contiguous() for p in (*model.parameters(), *masks.dense.parameters()))


def test_a_channels_last_model_stays_channels_last():
    torch.manual_seed(0)
    model = TinyCNN().to(memory_format=torch.channels_last)
    masks = regrow.prune(model, 0.5, keep_dense=False)
    regrow.recover(model, masks, image_task(2, 0), image_task(1, 1), method="finetune", epochs=1, channels_last=True)
    weight = model.conv2.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_gpu_recovery_benchmark_runs_in_smoke_mode(tmp_path):
    import json

    from benchmarks import gpu_recovery

    results = gpu_recovery.main(["--smoke", "--models", "resnet50", "--out", str(tmp_path / "r")])
    ratios = results["resnet50"]["ratios"]
    wanted = {"regrow / hand-written, fp32", "regrow / hand-written, bf16", "regrow bf16 speed-up over fp32"}
    assert wanted <= set(ratios)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"]["resnet50"]["compute"]["distill bf16"]["precision"] == "bf16"
    assert "regrow / hand-written" in (tmp_path / "r.md").read_text()
