"""regrow.accelerate: which 2:4 Linear layers can run on semi-structured sparse kernels, and the conversion step.

These tests run on the CPU, where no semi-structured kernels exist: the decisions (exact 2:4, dtype, shapes per
backend, device, tied weights, masks) are checked with a stated ``Hardware``, and the conversion step with fake
packers that record their calls. The real kernels (cuSPARSELt / CUTLASS) are exercised on a GPU by
``python -m benchmarks.semi_structured``, which checks every converted layer and the speed-up.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regrow
from regrow.accelerate import (
    CPU_MESSAGE,
    VERIFY_TOLERANCE,
    AccelerationReport,
    Hardware,
    LayerRow,
    SpeedResult,
    choose_backend,
    convert_layers,
    parse_dtype,
    plan_acceleration,
    restore_dense,
    shape_rule,
    two_four_violation,
)
from regrow.errors import SpeedWarning

acc = importlib.import_module("regrow.accelerate")  # `regrow.accelerate` itself is the function

H200 = Hardware(cuda=True, name="NVIDIA H200", capability=(9, 0), cusparselt=True, cusparselt_version=800)
A100 = Hardware(cuda=True, name="NVIDIA A100", capability=(8, 0), cusparselt=True)
A100_NO_CSLT = Hardware(cuda=True, name="NVIDIA A100", capability=(8, 0), cusparselt=False)
H100_NO_CSLT = Hardware(cuda=True, name="NVIDIA H100", capability=(9, 0), cusparselt=False)
T4 = Hardware(cuda=True, name="Tesla T4", capability=(7, 5), cusparselt=True)
CPU_ONLY = Hardware(cuda=False)


class Block(nn.Module):
    """A transformer MLP block, small: d -> 4d -> d."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def block_2to4(dtype: torch.dtype = torch.bfloat16, d: int = 32) -> tuple[Block, regrow.MaskSet]:
    torch.manual_seed(0)
    model = Block(d).to(dtype)
    with pytest.warns(SpeedWarning):  # prune says, rightly, that 2:4 alone is not faster on dense kernels
        masks = regrow.prune(model, pattern="2:4", targets=["fc1", "fc2"], keep_dense=False)
    return model, masks


def plan(model: nn.Module, masks=None, hardware: Hardware = H200, **kw) -> AccelerationReport:
    return plan_acceleration(model, masks, hardware=hardware, check_device=False, **kw)


def reasons(report: AccelerationReport) -> dict[str, str | None]:
    return {r.fqn: r.reason for r in report.layers}


# Exact 2:4 on the values -----------------------------------------------------------------------------------------
def test_two_four_accepts_at_most_two_nonzeros_per_group_of_four():
    assert two_four_violation(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])) is None
    assert two_four_violation(torch.zeros(3, 8)) is None  # fewer non-zeros are fine; any row count is
    assert two_four_violation(torch.tensor([[0.0, 5.0, -1.0, 0.0, 7.0, 7.0, 0.0, 0.0]])) is None


def test_two_four_refuses_three_of_four_and_says_where():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert two_four_violation(w) == (
        "not exactly 2:4: 1 of 4 groups of 4 consecutive input weights hold more than 2 non-zeros (the first at "
        "row 1, columns 4-7): prune with pattern '2:4' and keep the masks enforced during recovery"
    )
    assert "2 of 2 groups" in two_four_violation(torch.ones(1, 8))


def test_two_four_groups_run_along_rows_not_columns():
    # Each row is 2:4, although every column is dense: the groups are 4 consecutive *input* weights.
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4)
    assert two_four_violation(w) is None
    assert two_four_violation(w.t().contiguous()) is not None


def test_two_four_needs_whole_groups_and_two_dimensions():
    assert two_four_violation(torch.zeros(4, 6)) == (
        "in_features 6 is not a multiple of 4, so the weight cannot be split into groups of 4"
    )
    assert "2-D" in two_four_violation(torch.zeros(8))


def test_two_four_holds_for_regrow_2to4_masks_and_not_for_unstructured():
    model, _ = block_2to4(torch.float32)
    assert two_four_violation(model.fc1.weight) is None and two_four_violation(model.fc2.weight) is None
    other = Block()
    with pytest.warns(SpeedWarning):
        regrow.prune(other, 0.5, targets=["fc1"], scope="layer", keep_dense=False)
    assert two_four_violation(other.fc1.weight).startswith("not exactly 2:4")


def test_the_docstring_examples_run():
    assert doctest.testmod(acc, raise_on_error=True).attempted >= 1


# Backend, dtype and shape rules ----------------------------------------------------------------------------------
def test_shape_rule_is_torchs_own_table():
    assert shape_rule("cusparselt", torch.float16) == shape_rule("cusparselt", torch.bfloat16) == (16, 16)
    assert shape_rule("cutlass", torch.float16) == shape_rule("cutlass", torch.bfloat16) == (32, 64)
    table = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[torch.bfloat16]
    assert (table.sparse_min_rows, table.sparse_min_cols) == shape_rule("cusparselt", torch.bfloat16)


@pytest.mark.parametrize(
    "hardware, asked, chosen",
    [
        (H200, "auto", "cusparselt"),
        (H200, "cusparselt", "cusparselt"),
        (A100, "auto", "cusparselt"),
        (A100, "cutlass", "cutlass"),
        (A100_NO_CSLT, "auto", "cutlass"),
    ],
)
def test_backend_choice(hardware, asked, chosen):
    assert choose_backend(asked, hardware) == chosen


@pytest.mark.parametrize(
    "hardware, asked, message",
    [
        (H200, "cutlass", "runs only on compute capability 8.x"),
        (H100_NO_CSLT, "auto", "runs only on compute capability 8.x"),
        (A100_NO_CSLT, "cusparselt", "torch.backends.cusparselt.is_available() is False"),
        (T4, "auto", "has no sparse tensor cores"),
        (CPU_ONLY, "auto", "no semi-structured (2:4) sparse kernels exist for the CPU"),
        (H200, "triton", "unknown backend 'triton'; allowed values: auto, cusparselt, cutlass."),
    ],
)
def test_backend_refusals_say_why(hardware, asked, message):
    with pytest.raises(regrow.RegrowError) as info:
        choose_backend(asked, hardware)
    assert message in str(info.value)


def test_dtype_names_and_refusal():
    assert parse_dtype(None) is None
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("torch.bfloat16") is torch.bfloat16
    with pytest.raises(regrow.RegrowError, match=r"dtype torch.float32 cannot run .* allowed values: None"):
        parse_dtype(torch.float32)


def test_a_2to4_block_in_bf16_is_eligible_everywhere():
    model, masks = block_2to4()
    report = plan(model, masks)
    assert report.backend == "cusparselt"
    assert [(r.fqn, r.shape, r.dtype, r.eligible, r.reason) for r in report.layers] == [
        ("fc1.weight", (128, 32), "bfloat16", True, None),
        ("fc2.weight", (32, 128), "bfloat16", True, None),
    ]
    assert not report.converted  # planning converts nothing


def test_float32_is_refused_with_how_to_cast_and_dtype_makes_it_eligible():
    model, masks = block_2to4(torch.float32)
    refused = reasons(plan(model, masks))["fc1.weight"]
    assert refused.startswith("dtype float32: the kernels take float16 or bfloat16")
    assert "model.to(torch.bfloat16)" in refused and "dtype=torch.bfloat16" in refused
    report = plan(model, masks, dtype="bf16")
    assert all(r.eligible for r in report.layers) and report.dtype == "bfloat16"
    assert model.fc1.weight.dtype == torch.float32  # planning does not cast


def test_a_bias_of_another_dtype_is_refused():
    model, masks = block_2to4()
    model.fc2.bias.data = model.fc2.bias.data.float()
    assert reasons(plan(model, masks))["fc2.weight"] == (
        "bias dtype float32 differs from the weight's bfloat16: the kernel needs one dtype for both"
    )


@pytest.mark.parametrize(
    "backend, out_features, in_features, eligible",
    [
        ("cusparselt", 16, 16, True),
        ("cusparselt", 48, 32, True),
        ("cusparselt", 8, 16, False),  # fewer rows than 16
        ("cusparselt", 24, 16, False),  # 24 rows: not a multiple of 16
        ("cusparselt", 16, 12, False),  # 12 inputs: 2:4 is fine, the kernel is not
        ("cutlass", 32, 64, True),
        ("cutlass", 64, 128, True),
        ("cutlass", 16, 64, False),
        ("cutlass", 32, 32, False),
        ("cutlass", 32, 96, False),
    ],
)
def test_shapes_follow_the_backend_table(backend, out_features, in_features, eligible):
    layer = nn.Sequential(nn.Linear(in_features, out_features)).half()
    with torch.no_grad():
        layer[0].weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(in_features // 4).half())
    row = plan(layer, backend=backend, hardware=A100).layers[0]
    assert row.eligible is eligible
    if not eligible:
        need = shape_rule(backend, torch.float16)
        assert row.reason == (
            f"shape (out_features, in_features) = ({out_features}, {in_features}): {backend} needs both at least "
            f"and a multiple of {need}"
        )


def test_every_reason_is_listed_and_cpu_weights_are_refused():
    model = nn.Sequential(nn.Linear(6, 10))  # float32, odd shape, not 2:4, on the CPU
    report = plan_acceleration(model, hardware=H200)  # check_device=True
    parts = report.layers[0].reason.split("; ")
    assert [p.split(" ")[0] for p in parts] == ["on", "dtype", "shape", "in_features"]
    assert parts[0] == "on cpu: no semi-structured kernels exist there, move the model to the GPU"


def test_not_2to4_and_not_linear_and_tied_and_attention_are_refused():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(16, 16, 1)
            self.attn = nn.MultiheadAttention(32, 2)
            self.dense = nn.Linear(32, 32)
            self.emb = nn.Embedding(32, 32)
            self.head = nn.Linear(32, 32, bias=False)
            self.head.weight = self.emb.weight

    model = Mixed().half()
    with torch.no_grad():
        for p in (model.attn.out_proj.weight, model.head.weight):
            p.mul_(torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(8).half())
    got = reasons(plan(model, targets=["conv", "attn.out_proj", "dense", "head"]))
    assert got["conv.weight"] == "not the weight of an nn.Linear: only Linear layers run on semi-structured kernels"
    assert got["attn.out_proj.weight"].startswith("read directly by nn.MultiheadAttention's own forward")
    assert got["dense.weight"].startswith("not exactly 2:4")
    # A tied weight named in targets is reported under the name it was first registered by.
    assert got["emb.weight"].startswith("tied to 'head.weight': converting it would break the other user")
    assert reasons(plan(model))["head.weight"].startswith("tied to 'emb.weight'")


def test_a_parametrized_weight_is_refused():
    model, _ = block_2to4()
    torch.nn.utils.parametrize.register_parametrization(model.fc1, "weight", nn.Identity())
    got = reasons(plan(model))
    assert got["fc1.weight"] == "'weight' is computed, not a Parameter: remove its parametrization first"
    assert got["fc2.weight"] is None


def test_default_candidates_are_every_linear_or_the_masks():
    model, masks = block_2to4()
    extra = nn.Sequential(model, nn.Linear(32, 16).to(torch.bfloat16))
    assert [r.fqn for r in plan(extra).layers] == ["0.fc1.weight", "0.fc2.weight", "1.weight"]
    one = {"0.fc1.weight": masks["fc1.weight"]}
    assert [r.fqn for r in plan(extra, one).layers] == ["0.fc1.weight"]


# Masks -----------------------------------------------------------------------------------------------------------
def test_masks_that_disagree_with_the_weights_are_refused_and_nothing_changes():
    model, masks = block_2to4()
    before = copy.deepcopy(model.state_dict())
    wrong = {f: ~m for f, m in masks.items()}
    with pytest.raises(regrow.RegrowError, match=r"the masks disagree with the weights: 'fc1.weight' \(2,048 non-zero"):
        plan(model, wrong)
    with pytest.raises(regrow.RegrowError, match="mask 'fc1.weight' has shape \\(4, 4\\)"):
        plan(model, {"fc1.weight": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(regrow.RegrowError, match="masks name parameters the model lacks: \\['nope.weight'\\]"):
        plan(model, {"nope.weight": torch.ones(4, 4, dtype=torch.bool)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_masks_saying_keep_where_the_weight_is_zero_agree():
    model, masks = block_2to4()
    report = plan(model, {f: torch.ones_like(m) for f, m in masks.items()})  # weights are the truth
    assert all(r.eligible for r in report.layers)


# CPU ---------------------------------------------------------------------------------------------------------------
def test_on_a_machine_without_cuda_accelerate_explains_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, masks = block_2to4()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(regrow.RegrowError) as info:
        regrow.accelerate(model, masks, dtype=torch.float16)
    assert str(info.value) == CPU_MESSAGE
    assert "no semi-structured (2:4) sparse kernels exist for the CPU" in CPU_MESSAGE
    assert "model.to('cuda', torch.bfloat16)" in CPU_MESSAGE and "pattern 'channel' or 'head'" in CPU_MESSAGE
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not even cast
    with pytest.raises(regrow.RegrowError, match="no semi-structured"):
        acc.measure_speedup(model, model, torch.zeros(8, 32))


def test_a_model_left_on_the_cpu_of_a_gpu_machine_is_refused(monkeypatch):
    monkeypatch.setattr(acc.Hardware, "probe", classmethod(lambda cls, device=None: H200))
    model, masks = block_2to4(torch.float32)
    with pytest.raises(regrow.RegrowError, match=r"on the cpu, .* model.to\('cuda'\) \(this machine has NVIDIA H200\)"):
        regrow.accelerate(model, masks, dtype="bf16")
    assert model.fc1.weight.dtype == torch.float32


# The conversion step ---------------------------------------------------------------------------------------------
def test_conversion_packs_eligible_layers_only_through_torchs_function(monkeypatch):
    """torch.sparse.to_sparse_semi_structured is replaced by a recorder (it needs CUDA); the backend flag is set
    for the call and restored afterwards."""
    calls = []

    def fake(weight):
        calls.append((tuple(weight.shape), weight.dtype, weight.is_contiguous(), weight.requires_grad,
                      torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS))  # fmt: skip
        return weight.clone()

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake)
    model, masks = block_2to4(torch.float16, d=64)
    model = nn.Sequential(model, nn.Linear(64, 64).half())  # a dense layer: not 2:4
    x = torch.randn(8, 64).half()
    want = model(x)
    untouched = model[1].weight
    for backend, flag in (("cusparselt", False), ("cutlass", True)):
        calls.clear()
        report = convert_layers(model, plan(model, hardware=A100, backend=backend))
        assert calls == [((256, 64), torch.float16, True, False, flag), ((64, 256), torch.float16, True, False, flag)]
        assert report.converted == ["0.fc1.weight", "0.fc2.weight"]
        assert report.left_dense["1.weight"].startswith("not exactly 2:4")
        assert torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS is False
    assert model[1].weight is untouched
    assert isinstance(model[0].fc1.weight, nn.Parameter) and not model[0].fc1.weight.requires_grad
    assert torch.equal(model(x), want)


class FailingKernel(torch.Tensor):
    """Packs fine, fails in the matmul (as CUTLASS does on Hopper)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            raise RuntimeError("CUDA error: Supported only on GPUs with compute capability 8.x\nmore lines")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize(
    "packer, reason",
    [
        (lambda w, b: w.clone().as_subclass(FailingKernel),
         "the semi-structured kernel failed on this GPU: CUDA error: Supported only on GPUs with compute "
         "capability 8.x"),
        (lambda w, b: torch.zeros_like(w),
         "the semi-structured kernel gave wrong results: relative error 1.00e+00 > 3.1e-02"),
        (lambda w, b: (_ for _ in ()).throw(RuntimeError("Error original_tensor.shape is not supported!")),
         "torch refused to pack it: Error original_tensor.shape is not supported!"),
    ],
)  # fmt: skip
def test_a_layer_whose_kernel_fails_or_disagrees_stays_dense(packer, reason):
    model, masks = block_2to4()
    before = model.fc1.weight
    report = convert_layers(model, plan(model, masks), packer=packer)
    assert report.converted == [] and report.left_dense["fc1.weight"] == reason
    assert model.fc1.weight is before


def test_a_real_cutlass_packed_weight_cannot_run_on_the_cpu_and_restores_exactly():
    """The packing format is torch's real one (CUTLASS, built on the CPU); its matmul has no CPU kernel."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    def cutlass_on_cpu(weight, backend):
        packed, meta = sparse_semi_structured_from_dense_cutlass(weight)
        return torch.sparse.SparseSemiStructuredTensorCUTLASS(weight.shape, packed, meta, None, None, None)

    model, masks = block_2to4(torch.float16, d=64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prototype stage.*")
        report = convert_layers(model, plan(model, masks, hardware=A100, backend="cutlass"), packer=cutlass_on_cpu)
    assert report.converted == []
    assert report.left_dense["fc1.weight"].startswith("the semi-structured kernel failed on this GPU: Could not run")
    dense = model.fc1.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prototype stage.*")
        model.fc1.weight = nn.Parameter(cutlass_on_cpu(dense, "cutlass"), requires_grad=False)
    assert restore_dense(model) == ["fc1.weight"]
    assert type(model.fc1.weight) is nn.Parameter and torch.equal(model.fc1.weight, dense)


# The report ------------------------------------------------------------------------------------------------------
def test_the_report_serialises_and_renders():
    model, masks = block_2to4()
    report = plan(model, masks)
    report.layers.append(LayerRow("head.weight", (10, 32), "float32", "cuda:0", reason="dtype float32: ..."))
    report.speed = SpeedResult(3.04, 2.45, 3.04 / 2.45, 4.5e-3, "cuda_graph", 50, 10, "8192x4096 bfloat16", "H200")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["backend"] == "cusparselt" and data["hardware"]["capability"] == [9, 0]
    assert data["speed"]["speedup"] == pytest.approx(1.2408, abs=1e-4)
    text = report.markdown()
    assert "Backend cusparselt on NVIDIA H200: 0 of 3 layers converted." in text
    assert "| `head.weight` | 10x32 | float32 | no | dtype float32: ... |" in text
    assert "1.24x (faster than dense)" in text
    report.speed.speedup = 0.5
    assert "0.50x (SLOWER than dense)" in report.markdown()


# The whole of regrow.accelerate, with the GPU faked ----------------------------------------------------------------
class FakeEvent:
    """Stands in for torch.cuda.Event: every record() advances a clock by 1 ms."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        FakeEvent.clock += 1.0
        self.t = FakeEvent.clock

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.t - self.t


@pytest.fixture
def fake_gpu(monkeypatch):
    """A 'GPU' that is the CPU: H200 hardware, CPU tensors count as on it, CUDA events tick, packing clones."""
    packed = []
    monkeypatch.setattr(acc.Hardware, "probe", classmethod(lambda cls, device=None: H200))
    monkeypatch.setattr(acc, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: packed.append(w.shape) or w.clone())
    return packed


def test_accelerate_end_to_end_with_a_fake_gpu(fake_gpu):
    model, masks = block_2to4(torch.float32, d=64)
    x = torch.randn(16, 64)
    report = regrow.accelerate(model, masks, dtype="bf16", example_inputs=x, repeats=7, warmup=2)
    assert fake_gpu == [torch.Size([256, 64]), torch.Size([64, 256])]
    assert report.converted == ["fc1.weight", "fc2.weight"] and report.left_dense == {}
    assert model.fc1.weight.dtype == torch.bfloat16 and model.fc1.bias.dtype == torch.bfloat16  # dtype= cast all
    speed = report.speed
    assert (speed.dense_ms, speed.accelerated_ms, speed.speedup, speed.relative_error) == (1.0, 1.0, 1.0, 0.0)
    assert (speed.timing, speed.repeats, speed.warmup, speed.inputs, speed.device) == (
        "eager",
        7,
        2,
        "16x64 bfloat16",
        "cpu",
    )
    assert model.training  # the caller's mode is restored after timing
    assert json.loads(json.dumps(report.to_dict()))["speed"]["inputs"] == "16x64 bfloat16"


def test_cuda_graph_timing_says_when_it_fell_back_to_eager(fake_gpu):
    model, masks = block_2to4(torch.bfloat16, d=64)
    report = regrow.accelerate(model, masks, example_inputs=torch.randn(8, 64).bfloat16(), cuda_graph=True)
    assert report.speed.timing.startswith("eager (CUDA graph capture failed: ")
    dense, _ = block_2to4(torch.bfloat16, d=64)
    speed = acc.measure_speedup(dense, model, torch.randn(8, 64).bfloat16(), repeats=3, warmup=0)
    assert speed.timing == "eager" and speed.repeats == 3 and speed.relative_error == 0.0


def test_accelerate_warns_when_nothing_was_converted(fake_gpu):
    model = Block(64).half()  # dense: not 2:4
    with pytest.warns(SpeedWarning, match=r"converted no layer, so the model is no faster \(fc1.weight: not exactly"):
        report = regrow.accelerate(model)
    assert report.converted == [] and fake_gpu == []


class TwoDOnly(torch.Tensor):
    """Packs and passes the 2-D check, fails on the model's 3-D inputs (as a non-viewable input fails for real)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear and args[0].dim() != 2:
            raise RuntimeError("`SparseSemiStructuredTensor` matmul: Broadcasting is not implemented")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_example_inputs_that_fail_are_explained(fake_gpu, monkeypatch):
    model, masks = block_2to4(torch.float16, d=64)
    with pytest.raises(regrow.RegrowError, match=r"the dense model failed on example_inputs \(RuntimeError: mat1 and"):
        regrow.accelerate(model, masks, example_inputs=torch.randn(8, 64))  # float32 inputs, float16 layers
    assert type(model.fc1.weight) is nn.Parameter and not fake_gpu  # nothing was converted
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone().as_subclass(TwoDOnly))
    with pytest.raises(regrow.RegrowError, match=r"the accelerated model failed .*Broadcasting is not implemented\)"):
        regrow.accelerate(model, masks, example_inputs=torch.randn(2, 4, 64).half())
    with pytest.raises(regrow.RegrowError, match="unknown backend 'cuda'"):
        regrow.accelerate(model, masks, backend="cuda")


# Real kernels: only on a machine with CUDA (skipped on the CPU; benchmarks/semi_structured.py measures speed) -----
@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_kernels_convert_run_and_restore(dtype):
    model, masks = block_2to4(dtype, d=128)
    model.cuda()
    dense = {f: model.get_parameter(f).detach().clone() for f in masks}
    x = torch.randn(256, 128, device="cuda", dtype=dtype)
    report = regrow.accelerate(model, masks, example_inputs=x, repeats=5, warmup=2, cuda_graph=True)
    assert report.converted == ["fc1.weight", "fc2.weight"], report.left_dense
    assert isinstance(model.fc1.weight, torch.sparse.SparseSemiStructuredTensor)
    assert report.speed.relative_error < VERIFY_TOLERANCE[dtype] and report.speed.dense_ms > 0
    assert restore_dense(model) == ["fc1.weight", "fc2.weight"]
    assert all(torch.equal(model.get_parameter(f), w) for f, w in dense.items())
