"""Run 2:4-sparse ``nn.Linear`` layers on sparse tensor cores (``regrow.accelerate``).

A 2:4 model from :func:`regrow.prune` keeps dense shapes, so dense kernels run it no faster. Two steps, so that
the decisions can be checked without a GPU: :func:`plan_acceleration` says per layer whether its weight can be
packed by ``torch.sparse.to_sparse_semi_structured`` and why not (changing nothing); :func:`convert_layers`
packs the eligible ones in place, each checked against its dense weight on a random input first.

Backends: cuSPARSELt where the torch build has it (compute capability 8.0 or newer, the only one for Hopper);
CUTLASS only on 8.x (on Hopper its kernels fail with "Supported only on GPUs with compute capability 8.x").
No semi-structured kernels exist for the CPU. Converted layers are for inference: no gradients, inputs of the
layers' dtype, and :func:`restore_dense` before ``model.to(...)`` or saving a ``state_dict``.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regrow.batches import forward, model_device
from regrow.errors import RegrowError, SpeedWarning, one_of
from regrow.select import resolve_targets

BACKENDS = ("auto", "cusparselt", "cutlass")
DTYPES = {n: torch.float16 for n in ("float16", "fp16", "half")} | {n: torch.bfloat16 for n in ("bfloat16", "bf16")}
FALLBACK_SHAPES = {"cusparselt": (16, 16), "cutlass": (32, 64)}
# Packed vs dense on a random input: 4 machine epsilons pass rounding, not broken kernels (errors near 1).
VERIFY_TOLERANCE = {torch.float16: 4 * 2.0**-10, torch.bfloat16: 4 * 2.0**-7}

NOTES = (
    "Converted layers are for inference (no gradients); restore_dense(model) before model.to(...) or saving.",
    "Inputs must have the layers' dtype; torch pads a token count that is not a multiple of 8 (slower).",
    "Few tokens (decoding, M <= ~256) run slower than dense; gains need M >= ~1024-4096 tokens per call.",
    "torch's semi-structured sparse tensors are a prototype API.",
)
CPU_MESSAGE = (
    "regrow.accelerate needs an NVIDIA GPU: no semi-structured (2:4) sparse kernels exist for the CPU, where a 2:4 "
    "model runs at exactly dense speed (torch.cuda.is_available() is False here). "
    "torch.sparse.to_sparse_semi_structured runs only on CUDA, with cuSPARSELt (compute capability 8.0 or newer: "
    "Ampere, Ada, Hopper, Blackwell) or CUTLASS (compute capability 8.x only). What is needed: a CUDA build of "
    "PyTorch, such a GPU, and the model on it in float16 or bfloat16, e.g. model.to('cuda', torch.bfloat16). "
    "For speed on the CPU, shrink the model instead: pattern 'channel' or 'head'."
)


@dataclass(frozen=True)
class Hardware:
    """What the semi-structured kernels depend on: a CUDA device, its compute capability, cuSPARSELt."""

    cuda: bool
    name: str | None = None
    capability: tuple[int, int] | None = None
    cusparselt: bool = False
    cusparselt_version: int | None = None

    @classmethod
    def probe(cls, device: torch.device | None = None) -> Hardware:
        """The machine's hardware (``device``: the CUDA device to ask about; default the current one)."""
        if not torch.cuda.is_available():
            return cls(cuda=False)
        index = device.index if device is not None and device.type == "cuda" else None
        return cls(
            cuda=True,
            name=torch.cuda.get_device_name(index),
            capability=tuple(torch.cuda.get_device_capability(index)),  # type: ignore[arg-type]
            cusparselt=bool(torch.backends.cusparselt.is_available()),
            cusparselt_version=torch.backends.cusparselt.version(),
        )


@dataclass
class LayerRow:
    """One candidate weight: whether it can be (and was) converted, and why not."""

    fqn: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    eligible: bool = False
    converted: bool = False
    reason: str | None = None


@dataclass
class SpeedResult:
    """Dense against accelerated forward time on the same inputs, same dtype, same process."""

    dense_ms: float
    accelerated_ms: float
    speedup: float
    relative_error: float
    timing: str  # "eager" (host launch cost included), "cuda_graph" (kernel time), or why graphs were not used
    repeats: int
    warmup: int
    inputs: str
    device: str

    def summary(self) -> str:
        return (
            f"{self.dense_ms:.3f} ms dense -> {self.accelerated_ms:.3f} ms accelerated: {self.speedup:.2f}x "
            f"({'SLOWER' if self.speedup < 1.0 else 'faster'} than dense), relative output error "
            f"{self.relative_error:.1e}; {self.timing}, median of {self.repeats} after {self.warmup} warm-up runs, "
            f"inputs {self.inputs} on {self.device}."
        )


@dataclass
class AccelerationReport:
    """What :func:`accelerate` (or :func:`plan_acceleration`) decided, per layer, and the speed it measured."""

    backend: str
    dtype: str | None  # the cast asked for with dtype=, if any
    hardware: dict[str, Any]
    layers: list[LayerRow] = field(default_factory=list)
    speed: SpeedResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [r.fqn for r in self.layers if r.converted]

    @property
    def left_dense(self) -> dict[str, str]:
        """fqn -> why the layer stays dense."""
        return {r.fqn: r.reason or "not converted" for r in self.layers if not r.converted}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        """A short Markdown section: backend, per-layer table, measured speed."""
        head = f"Backend {self.backend} on {self.hardware.get('name') or 'no GPU'}: {len(self.converted)} of "
        head += f"{len(self.layers)} layers converted."
        lines = [head, "", "| layer | shape | dtype | converted | reason left dense |", "|---|---|---|---|---|"]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            lines.append(f"| `{r.fqn}` | {shape} | {r.dtype} | {'yes' if r.converted else 'no'} | {r.reason or ''} |")
        if self.speed is not None:
            lines += ["", f"Measured: {self.speed.summary()}"]
        lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines).rstrip() + "\n"


def two_four_violation(weight: Tensor) -> str | None:
    """Why ``weight`` is not exactly 2:4 in its values, or None when it is.

    2:4: in every row, each group of 4 consecutive input weights (columns 0-3, 4-7, ...) holds at most 2
    non-zeros. The weights are the truth: a mask saying 2:4 does not make a weight 2:4.

    >>> two_four_violation(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])) is None
    True
    """
    if weight.dim() != 2:
        return f"2:4 needs a 2-D weight; this one has shape {tuple(weight.shape)}"
    rows, cols = weight.shape
    if cols % 4:
        return f"in_features {cols} is not a multiple of 4, so the weight cannot be split into groups of 4"
    counts = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(dim=-1)
    bad = counts > 2
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    row, group = (int(i) for i in bad.nonzero()[0])
    return (
        f"not exactly 2:4: {n_bad:,} of {counts.numel():,} groups of 4 consecutive input weights hold more than 2 "
        f"non-zeros (the first at row {row}, columns {4 * group}-{4 * group + 3}): prune with pattern '2:4' and keep "
        "the masks enforced during recovery"
    )


def shape_rule(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    """(min rows, min cols) of a weight, also the multiples both dimensions must be: torch's own table when it has
    one, else FALLBACK_SHAPES."""
    classes = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}
    cls = getattr(torch.sparse, classes[backend], None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}) or {}
    if dtype in table:
        return int(table[dtype].sparse_min_rows), int(table[dtype].sparse_min_cols)
    return FALLBACK_SHAPES[backend]


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype=`` of :func:`accelerate`: None, torch.float16 / torch.bfloat16, or their names."""
    if dtype is None or dtype in (torch.float16, torch.bfloat16):
        return dtype  # type: ignore[return-value]
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise RegrowError(
        f"dtype {dtype!r} cannot run on semi-structured sparse kernels; allowed values: None (keep the model's), "
        "torch.float16 ('float16', 'fp16', 'half') or torch.bfloat16 ('bfloat16', 'bf16')."
    )


def choose_backend(backend: str, hardware: Hardware) -> str:
    """The backend to use: ``"cusparselt"`` or ``"cutlass"``.

    Raises:
        RegrowError: an unknown backend, no CUDA device, or a backend this GPU / torch build cannot run.
    """
    if backend not in BACKENDS:
        raise one_of("backend", backend, BACKENDS)
    if not hardware.cuda:
        raise RegrowError(CPU_MESSAGE)
    cap = hardware.capability or (0, 0)
    gpu = f"{hardware.name} (compute capability {cap[0]}.{cap[1]})"
    if cap < (8, 0):
        raise RegrowError(f"{gpu} has no sparse tensor cores: 2:4 kernels need compute capability 8.0 or newer.")
    if backend == "auto":
        backend = "cusparselt" if hardware.cusparselt else "cutlass"
    if backend == "cusparselt" and not hardware.cusparselt:
        raise RegrowError(
            "this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False); install a "
            "CUDA wheel of PyTorch that bundles it (the official ones do), or use backend='cutlass' on compute "
            f"capability 8.x. The GPU is {gpu}."
        )
    if backend == "cutlass" and cap[0] != 8:
        raise RegrowError(
            f"backend 'cutlass' runs only on compute capability 8.x (its kernels fail elsewhere with \"Supported "
            f"only on GPUs with compute capability 8.x\"); the GPU is {gpu}. Use backend='cusparselt' or 'auto'."
        )
    return backend


def _candidates(model: nn.Module, masks: Mapping[str, Tensor] | None, targets: Any) -> list[str]:
    """Weight fqns to consider: ``targets`` if given, else the masks' names, else every nn.Linear weight."""
    if targets is not None:
        return resolve_targets(model, targets)
    if masks:
        unknown = [f for f in masks if f not in dict(model.named_parameters())]
        if unknown:
            raise RegrowError(
                f"masks name parameters the model lacks: {unknown[:5]}; the masks were made for another model."
            )
        return list(masks)
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Refuse masks that disagree with the weights (a non-zero weight where its mask says pruned)."""
    disagree = []
    for fqn, mask in masks.items():
        weight = model.get_parameter(fqn)
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            continue  # packed already: its values were checked before packing
        if tuple(mask.shape) != tuple(weight.shape):
            raise RegrowError(
                f"mask {fqn!r} has shape {tuple(mask.shape)} but the weight has shape {tuple(weight.shape)}; the "
                "masks were made for another model."
            )
        stray = int(((weight.detach() != 0) & ~mask.to(weight.device, torch.bool)).sum())
        if stray:
            disagree.append(f"{fqn!r} ({stray:,} non-zero weights where the mask says pruned)")
    if disagree:
        raise RegrowError(
            f"the masks disagree with the weights: {', '.join(disagree[:5])}. Apply them first (masks.apply(model)), "
            "pass the masks that were used for these weights, or pass none: the weights' own zeros are checked."
        )


def _layer_reasons(
    model: nn.Module, fqn: str, backend: str, cast: torch.dtype | None, check_device: bool, owners: dict[str, Any]
) -> tuple[LayerRow, list[str]]:
    """The row of one candidate weight and every reason it cannot be converted (empty: it can)."""
    module_name, _, leaf = fqn.rpartition(".")
    module = model.get_submodule(module_name)
    weight = getattr(module, leaf)
    dtype = cast or weight.dtype
    row = LayerRow(fqn, tuple(weight.shape), str(dtype).removeprefix("torch."), str(weight.device))
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return row, ["already a semi-structured sparse tensor (converted before)"]
    if leaf not in module._parameters:  # e.g. computed by torch.nn.utils.parametrize
        return row, [f"'{leaf}' is computed, not a Parameter: remove its parametrization first"]
    reasons = []
    others = [n for n in owners["#tied"].get(id(weight), []) if n != fqn]
    if others:
        reasons.append(f"tied to {others[0]!r}: converting it would break the other user of the same tensor")
    if not isinstance(module, nn.Linear) or leaf != "weight":
        return row, [*reasons, "not the weight of an nn.Linear: only Linear layers run on semi-structured kernels"]
    if module_name and isinstance(owners.get(module_name.rpartition(".")[0]), nn.MultiheadAttention):
        reasons.append("read directly by nn.MultiheadAttention's own forward, not through Linear.forward")
    if check_device and not _on_gpu(weight):
        reasons.append(f"on {weight.device.type}: no semi-structured kernels exist there, move the model to the GPU")
    if dtype not in (torch.float16, torch.bfloat16):
        cast_how = "model.half(), model.to(torch.bfloat16) or dtype=torch.bfloat16"
        reasons.append(f"dtype {row.dtype}: the kernels take float16 or bfloat16 (cast with {cast_how})")
    elif module.bias is not None and (cast or module.bias.dtype) != dtype:
        bias = str(module.bias.dtype).removeprefix("torch.")
        reasons.append(f"bias dtype {bias} differs from the weight's {row.dtype}: the kernel needs one dtype for both")
    rows, cols = weight.shape
    need_r, need_c = shape_rule(backend, dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)
    if rows < need_r or rows % need_r or cols < need_c or cols % need_c:
        reasons.append(
            f"shape (out_features, in_features) = ({rows}, {cols}): {backend} needs both at least and a multiple of "
            f"({need_r}, {need_c})"
        )
    violation = two_four_violation(weight)
    if violation:
        reasons.append(violation)
    return row, reasons


def plan_acceleration(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    backend: str = "auto",
    dtype: torch.dtype | str | None = None,
    targets: Any = None,
    hardware: Hardware | None = None,
    check_device: bool = True,
) -> AccelerationReport:
    """Decide, per candidate weight, whether :func:`accelerate` can convert it (every reason, joined by "; ");
    the model is not changed. ``hardware`` defaults to this machine's; pass one, with ``check_device=False``, to
    plan for a GPU from anywhere (e.g. to check a CPU model before moving it).

    Raises:
        RegrowError: an unknown backend or dtype, no CUDA device (see :data:`CPU_MESSAGE`), a backend the GPU
            cannot run, or masks that do not belong to the weights.
    """
    cast = parse_dtype(dtype)
    hw = hardware if hardware is not None else Hardware.probe(model_device(model))
    chosen = choose_backend(backend, hw)
    fqns = _candidates(model, masks, targets)
    if masks:
        _check_masks(model, {f: m for f, m in masks.items() if f in fqns})
    owners: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    owners["#tied"] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners["#tied"].setdefault(id(param), []).append(name)
    layers = []
    for fqn in fqns:
        row, reasons = _layer_reasons(model, fqn, chosen, cast, check_device, owners)
        row.eligible, row.reason = not reasons, "; ".join(reasons) or None
        layers.append(row)
    report = AccelerationReport(chosen, str(cast).removeprefix("torch.") if cast else None, asdict(hw), layers)
    report.notes = list(NOTES)
    return report


def _on_gpu(tensor: Tensor) -> bool:
    return tensor.device.type == "cuda"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def pack(weight: Tensor, backend: str) -> Tensor:
    """``torch.sparse.to_sparse_semi_structured(weight)`` on ``backend``, chosen with torch's class flag, which is
    restored afterwards (a packed tensor keeps its backend's class)."""
    cls = torch.sparse.SparseSemiStructuredTensor
    before, cls._FORCE_CUTLASS = cls._FORCE_CUTLASS, backend == "cutlass"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")
            return torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
    finally:
        cls._FORCE_CUTLASS = before


def _verify(dense: Tensor, packed: Tensor) -> str | None:
    """Run the packed weight on a random input against the dense weight; why it fails, or None."""
    generator = torch.Generator(device=dense.device).manual_seed(0)  # leaves the caller's random state alone
    x = torch.randn(64, dense.shape[1], generator=generator, device=dense.device).to(dense.dtype)
    try:
        with torch.no_grad():
            got, want = F.linear(x, packed).float(), F.linear(x, dense).float()
    except (RuntimeError, NotImplementedError) as exc:
        return f"the semi-structured kernel failed on this GPU: {_first_line(exc)}"
    error = relative_error(got, want)
    tolerance = VERIFY_TOLERANCE[dense.dtype]
    if not error <= tolerance:
        return f"the semi-structured kernel gave wrong results: relative error {error:.2e} > {tolerance:.1e}"
    return None


def convert_layers(
    model: nn.Module, report: AccelerationReport, *, packer: Callable[[Tensor, str], Tensor] = pack
) -> AccelerationReport:
    """Pack every eligible layer of ``report`` in place (rows updated: ``converted`` or a ``reason``).

    Each packed weight is first checked against the dense one on a random input; a layer whose kernel fails
    or disagrees keeps its dense weight. ``packer`` is the conversion (tests pass a fake; the real kernels are
    exercised on a GPU by benchmarks/semi_structured.py).
    """
    for row in report.layers:
        if not row.eligible:
            continue
        module_name = row.fqn.rpartition(".")[0]
        linear = model.get_submodule(module_name)
        dense = linear.weight.detach()
        try:
            packed = packer(dense, report.backend)
        except (RuntimeError, NotImplementedError) as exc:
            row.reason = f"torch refused to pack it: {_first_line(exc)}"
            continue
        row.reason = _verify(dense, packed)
        if row.reason is None:
            linear.weight = nn.Parameter(packed, requires_grad=False)
            row.converted = True
    return report


def restore_dense(model: nn.Module) -> list[str]:
    """Turn every semi-structured ``nn.Linear`` weight back into a dense Parameter (exact); returns their fqns."""
    restored = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            module.weight = nn.Parameter(weight.to_dense(), requires_grad=False)
            restored.append(f"{name}.weight" if name else "weight")
    return restored


def _runner(model: nn.Module, inputs: Any, cuda_graph: bool) -> tuple[Callable[[], Tensor], str]:
    """A call that runs one forward pass, and the timing mode it stands for."""
    if not cuda_graph:
        return (lambda: forward(model, inputs)), "eager"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward(model, inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward(model, inputs)
    except (RuntimeError, AssertionError) as exc:  # AssertionError: torch built without CUDA
        return (lambda: forward(model, inputs)), f"eager (CUDA graph capture failed: {_first_line(exc)})"

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay, "cuda_graph"


@torch.inference_mode()
def _timed(model: nn.Module, inputs: Any, repeats: int, warmup: int, cuda_graph: bool) -> tuple[float, Tensor, str]:
    """Median ms of one forward pass (CUDA events, after ``warmup`` calls), a copy of the output, the timing mode."""
    was_training = model.training
    model.eval()
    try:
        call, mode = _runner(model, inputs, cuda_graph)
        for _ in range(warmup):
            call()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        out = call().clone()
    finally:
        model.train(was_training)
    return statistics.median(s.elapsed_time(e) for s, e in events), out, mode


def relative_error(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want||, in float32."""
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"{'x'.join(map(str, inputs.shape))} {str(inputs.dtype).removeprefix('torch.')}"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__


def _speed(before: tuple, after: tuple, inputs: Any, options: tuple) -> SpeedResult:
    """The SpeedResult of two ``_timed`` results."""
    (dense_ms, dense_out, dense_mode), (ms, out, mode) = before, after
    timing = mode if mode == dense_mode else f"dense {dense_mode}, accelerated {mode}"
    device = torch.cuda.get_device_name(out.device) if out.is_cuda else str(out.device)
    error = relative_error(out, dense_out)
    return SpeedResult(dense_ms, ms, dense_ms / ms, error, timing, options[0], options[1], _describe(inputs), device)


def measure_speedup(
    dense: nn.Module,
    accelerated: nn.Module,
    inputs: Any,
    *,
    repeats: int = 50,
    warmup: int = 10,
    cuda_graph: bool = False,
) -> SpeedResult:
    """Time ``dense`` then ``accelerated`` on the same CUDA inputs (same dtype): CUDA events, ``warmup`` calls, the
    median of ``repeats``. Eager timing includes the host's launch cost (large for the sparse path);
    ``cuda_graph=True`` replays a captured graph: kernel time (eager, saying so, if capture fails).

    Raises:
        RegrowError: no CUDA device.
    """
    if not torch.cuda.is_available():
        raise RegrowError(CPU_MESSAGE)
    options = (max(1, repeats), max(0, warmup), cuda_graph)
    return _speed(_timed(dense, inputs, *options), _timed(accelerated, inputs, *options), inputs, options)


def _timed_or_explained(model: nn.Module, report: AccelerationReport, inputs: Any, options: tuple) -> tuple:
    """Time the model; a forward pass that fails is explained, and after conversion puts the dense weights back."""
    try:
        return _timed(model, inputs, *options)
    except (RuntimeError, NotImplementedError) as exc:
        if after := bool(report.converted):
            restore_dense(model)
            for row in report.layers:
                row.converted = False
        raise RegrowError(
            f"the {'accelerated' if after else 'dense'} model failed on example_inputs ({type(exc).__name__}: "
            f"{_first_line(exc)}){'; its layers were restored to dense' if after else ', nothing was converted'}. "
            "Semi-structured weights need inputs of their dtype (float16/bfloat16, on the model's device) that can be "
            "viewed as 2-D, used through F.linear / mm / addmm only."
        ) from None


def _cast_inputs(inputs: Any, device: torch.device, cast: torch.dtype | None) -> Any:
    """Inputs on the model's device; with ``dtype=``, floating-point tensors cast to it as well."""
    if isinstance(inputs, Tensor):
        inputs = inputs.to(device)
        return inputs.to(cast) if cast is not None and inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _cast_inputs(v, device, cast) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_cast_inputs(v, device, cast) for v in inputs)
    return inputs


def accelerate(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    backend: str = "auto",
    dtype: torch.dtype | str | None = None,
    targets: Any = None,
    example_inputs: Any = None,
    repeats: int = 50,
    warmup: int = 10,
    cuda_graph: bool = False,
) -> AccelerationReport:
    """Pack the exactly-2:4 ``nn.Linear`` weights of a CUDA model into semi-structured sparse tensors, in place.

    Candidates: ``targets`` (names or globs) if given, else the weights in ``masks``, else every ``nn.Linear``.
    One is converted only if its values are exactly 2:4, it and its bias are float16 or bfloat16, both dimensions
    are at least and a multiple of the backend's minimum (cuSPARSELt 16 x 16, CUTLASS 32 x 64), on the GPU, and
    its packed form matches the dense weight on a random input; every other layer stays dense, its reason in the
    report. ``masks`` are optional (the weights are the truth) but must agree with the weights. ``backend``:
    ``"auto"`` (cuSPARSELt when torch has it, the only one for Hopper; else CUTLASS on compute capability 8.x),
    ``"cusparselt"`` or ``"cutlass"``. ``dtype``: cast the whole model first (float16 / bfloat16).

    With ``example_inputs`` (floating-point tensors cast to ``dtype`` when given) the model is timed before and
    after conversion (CUDA events, ``warmup`` calls, median of ``repeats``; ``cuda_graph=True``: kernel time
    without launch cost) and ``report.speed`` holds the speed-up, below 1x too, and the relative output error.

    Example::

        masks = regrow.prune(model, pattern="2:4", targets=["*.fc1", "*.fc2"])
        model.to("cuda", torch.bfloat16)
        report = regrow.accelerate(model, masks, example_inputs=x.to("cuda", torch.bfloat16))
        print(report.converted, report.left_dense, report.speed.speedup)

    Raises:
        RegrowError: no CUDA device (no semi-structured kernels exist for the CPU), the model on the CPU, an unknown
            backend or dtype, a backend the GPU cannot run, masks that disagree with the weights (nothing is changed
            then), or a converted model failing on ``example_inputs`` (its layers are restored to dense).
    """
    cast = parse_dtype(dtype)
    hardware = Hardware.probe(model_device(model))
    if not hardware.cuda:
        raise RegrowError(CPU_MESSAGE)
    report = plan_acceleration(model, masks, backend=backend, dtype=cast, targets=targets, hardware=hardware)
    if report.layers and not any(_on_gpu(model.get_parameter(r.fqn)) for r in report.layers):
        raise RegrowError(
            f"the layers to accelerate are on the {report.layers[0].device}, where no semi-structured sparse kernels "
            f"exist; move the model to the GPU first, e.g. model.to('cuda') (this machine has {hardware.name})."
        )
    if cast is not None:
        model.to(cast)
    options, inputs, dense = (max(1, repeats), max(0, warmup), cuda_graph), None, None
    if example_inputs is not None:
        inputs = _cast_inputs(example_inputs, model_device(model), cast)
        dense = _timed_or_explained(model, report, inputs, options)
    convert_layers(model, report)
    if dense is not None:
        report.speed = _speed(dense, _timed_or_explained(model, report, inputs, options), inputs, options)
    if not report.converted:
        why = "; ".join(f"{f}: {r}" for f, r in list(report.left_dense.items())[:3]) or "the model has no nn.Linear"
        warnings.warn(f"regrow.accelerate converted no layer, so the model is no faster ({why}).", SpeedWarning, 2)
    return report
