"""Layer-by-layer calibration: the engine under the calibrated criteria (``wanda``, ``sparsegpt``).

A calibrated criterion decides a layer's mask from the inputs the layer sees on calibration batches, and
those inputs depend on how the layers before it were pruned. So layers are pruned in the order the model
calls them, each one calibrated on the outputs of the already-pruned layers before it (as the Wanda and
SparseGPT reference code do):

* **blocks** — the repeated layers of a transformer (the children of the ``nn.ModuleList`` that holds the
  most targets). All targets of a block are calibrated together, on the block's inputs, and then pruned.
  The inputs of the first block are captured once (the forward pass stops there); each block is then run on
  those inputs to gather its targets' statistics, pruned, and run again to give the next block its inputs.
  Peak memory is one block plus the calibration activations at one block boundary, not the whole model's
  activations.
* **other targets** (a stem, a classifier head, every layer of a model without such a list) — one at a
  time, each with full forward passes over the calibration batches after the layers before it are pruned.

The block shortcut is taken only when one forward pass shows the blocks run as a chain: each called once, in
order, each block's first argument being the previous block's output and every other argument the same
object. Otherwise each block gets full forward passes instead (same masks, more compute).

Supported layers: ``nn.Linear``, ``nn.Conv2d`` (groups 1), and Hugging Face ``Conv1D`` (GPT-2). Each
weight is handled as a 2-D matrix (outputs, inputs), with the inputs ordered so that the ``m`` weights of
an n:m group (consecutive input channels, as :mod:`regrow.patterns` groups them) are adjacent columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import regrow.distributed as distributed
from regrow.batches import model_device, to_device, unpack
from regrow.errors import RegrowError
from regrow.progress import bar
from regrow.select import is_transposed_linear

CALIBRATION_BATCHES = 16


@dataclass(frozen=True)
class Calibration:
    """Settings of the calibrated criteria.

    Args:
        batches: calibration batches read from ``data`` (the papers use 128 sequences of 2,048 tokens).
        dampening: sparsegpt: added to the Hessian's diagonal, as a fraction of its mean (paper: 0.01).
        block_size: sparsegpt: columns pruned and updated together before the lazy update of the rest (paper: 128).
    """

    batches: int = CALIBRATION_BATCHES
    dampening: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise RegrowError(f"calibration batches must be a whole number of at least 1; got {self.batches!r}.")
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, int | float) or not self.dampening > 0:
            raise RegrowError(
                f"calibration dampening must be a number above 0 (a fraction of the Hessian's mean diagonal, "
                f"usually 0.01); got {self.dampening!r}."
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise RegrowError(f"calibration block_size must be a whole number of at least 1; got {self.block_size!r}.")

    @classmethod
    def of(cls, options: dict[str, Any] | None) -> Calibration:
        return cls(**(options or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- layouts


def supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):  # zero padding by numbers: what unfold reproduces
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def to_matrix(module: nn.Module, tensor: Tensor) -> Tensor:
    """A tensor shaped like the module's weight as (outputs, inputs); a conv's columns run over the kernel
    positions, then the input channels (so n:m groups of channels are adjacent)."""
    if isinstance(module, nn.Conv2d):
        return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    if is_transposed_linear(module):
        return tensor.t()
    return tensor


def from_matrix(module: nn.Module, matrix: Tensor) -> Tensor:
    """The inverse of :func:`to_matrix`."""
    if isinstance(module, nn.Conv2d):
        out, cin, kh, kw = module.weight.shape
        return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    if is_transposed_linear(module):
        return matrix.t().contiguous()
    return matrix


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows (one per token, pixel or sample) whose columns match :func:`to_matrix`."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C*kh*kw, L)
        b, _, positions = cols.shape
        cin = module.in_channels
        cols = cols.reshape(b, cin, -1, positions).permute(0, 3, 2, 1)  # (B, L, kh*kw, C)
        return cols.reshape(b * positions, -1).float()
    return x.reshape(-1, x.shape[-1]).float()


# ------------------------------------------------------------------------------------------ statistics


class Statistics:
    """What one target's inputs add up to over the calibration batches: per-column sums of squares (Wanda) and,
    when asked for, the Gram matrix ``XᵀX`` (SparseGPT's Hessian up to a factor)."""

    def __init__(self, hessian: bool) -> None:
        self.hessian = hessian
        self.rows = 0
        self.sumsq: Tensor | None = None
        self.gram: Tensor | None = None

    def add(self, x: Tensor) -> None:
        self.rows += x.shape[0]
        sq = (x * x).sum(0)
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        if self.hessian:
            g = x.t() @ x
            self.gram = g if self.gram is None else self.gram + g

    def zeros_if_unseen(self, module: nn.Module) -> None:
        """Zero statistics of the layer's width when it saw no rows here (so they can be summed with others)."""
        if self.sumsq is None:
            width = to_matrix(module, module.weight).shape[1]
            self.sumsq = torch.zeros(width, device=module.weight.device)
            if self.hessian:
                self.gram = torch.zeros(width, width, device=module.weight.device)

    @property
    def norms(self) -> Tensor:
        """‖X_j‖₂ of every input column over all calibration rows."""
        assert self.sumsq is not None
        return self.sumsq.sqrt()


@contextmanager
def _watching(modules: dict[str, nn.Module], hessian: bool, sharded: bool = False) -> Iterator[dict[str, Statistics]]:
    """The statistics of ``modules``' inputs in the forward passes of the block; ``sharded``: the passes saw this
    rank's part of each batch (``regrow.distributed``), so the statistics are summed over the ranks after it."""
    stats = {f: Statistics(hessian) for f in modules}
    handles = []
    for f, mod in modules.items():

        def hook(m: nn.Module, args: tuple, out: Any, s: Statistics = stats[f]) -> None:
            s.add(input_rows(m, args[0].detach()))

        handles.append(mod.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
    if sharded:  # every rank then holds the statistics of all the calibration rows, as one process would
        for f, s in stats.items():
            s.rows = round(distributed.all_sum([s.rows])[0])
            if s.rows:
                s.zeros_if_unseen(modules[f])  # a rank whose part never reached the layer adds zeros, not nothing
                distributed.sum_([s.sumsq, s.gram])
    for f, s in stats.items():
        if s.rows == 0:
            raise RegrowError(
                f"target {f!r} was never called in a forward pass over the calibration data, so a calibrated "
                "criterion cannot score it; leave it out with ignore, or use criterion 'magnitude'."
            )


# ------------------------------------------------------------------------------------------------ engine


def target_modules(model: nn.Module, targets: list[str], criterion: str) -> dict[str, nn.Module]:
    """The layer that owns each target weight; a RegrowError for targets a calibrated criterion cannot score."""
    out = {}
    for f in targets:
        owner, _, leaf = f.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf != "weight" or not supported(module):
            raise RegrowError(
                f"criterion {criterion!r} scores the weights of Linear, Conv2d (groups 1, zero padding given as "
                "numbers) and Hugging Face Conv1D "
                f"layers from their calibration inputs; target {f!r} is the {leaf!r} of a "
                f"{type(module).__name__}. Leave it out with ignore, or use criterion 'magnitude'."
            )
        out[f] = module
    return out


def calibration_inputs(data: Iterable[Any] | None, batches: int, device: torch.device, criterion: str) -> list[Any]:
    """The inputs of the first ``batches`` batches of ``data``, on the model's device."""
    if data is None:
        raise RegrowError(
            f"criterion {criterion!r} needs calibration data: pass data= (an iterable of (inputs, targets) "
            "batches, or dicts with input_ids) to regrow.prune, or choose criterion 'magnitude'."
        )
    out = []
    for batch in islice(data, batches):
        inputs = batch if isinstance(batch, dict) and "labels" not in batch else unpack(batch)[0]
        out.append(to_device(inputs, device))
    if not out:
        raise RegrowError(f"criterion {criterion!r} got an empty data iterable; it needs at least one batch.")
    return out


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it wanted are captured."""


def _blocks(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the children of the ModuleList that holds the most targets (a transformer's layers), or []."""
    best: list[str] = []
    best_count = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        prefix = f"{name}." if name else ""
        count = sum(f.startswith(prefix) for f in targets)
        if count > best_count:
            best, best_count = [f"{prefix}{i}" for i in range(len(mod))], count
    return best


def _call_order(
    model: nn.Module, modules: dict[str, nn.Module], blocks: list[str], inputs: Any
) -> tuple[list[str], bool]:
    """The targets in the order one forward pass first calls them, and whether the blocks run as a chain."""
    order: list[str] = []
    seen: dict[int, list[str]] = {}
    for f, m in modules.items():
        seen.setdefault(id(m), []).append(f)
    calls: list[tuple[int, tuple, dict, Any]] = []  # (block index, args, kwargs, output)
    handles = []
    for f_list in seen.values():
        mod = modules[f_list[0]]

        def hook(m: nn.Module, args: tuple, out: Any, names: list[str] = f_list) -> None:
            order.extend(n for n in names if n not in order)

        handles.append(mod.register_forward_hook(hook))
    for i, name in enumerate(blocks):
        block = model.get_submodule(name)

        def pre(m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            calls.append((i, args, kwargs, None))

        def post(m: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
            calls[-1] = (i, args, kwargs, out) if calls and calls[-1][0] == i else calls[-1]

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    chain = bool(blocks) and [c[0] for c in calls] == list(range(len(blocks)))
    for (_, a0, k0, out), (_, a1, k1, _) in zip(calls, calls[1:]):
        if not chain:
            break
        chain = (
            bool(a1)
            and out is not None
            and a1[0] is _first(out)
            and len(a0) == len(a1)
            and all(x is y for x, y in zip(a0[1:], a1[1:]))
            and k0.keys() == k1.keys()
            and all(k0[k] is k1[k] for k in k0)
        )
    missing = [f for f in modules if f not in order]
    if missing:
        raise RegrowError(
            f"target {missing[0]!r} was never called in a forward pass over the calibration data, so a calibrated "
            "criterion cannot score it; leave it out with ignore, or use criterion 'magnitude'."
        )
    return order, chain


@contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, and no key/value cache (re-running a block must not attend to its last run)."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache  # type: ignore[union-attr]


Solve = Callable[[str, nn.Module, Statistics], Tensor]
"""(target, layer, statistics) -> keep-mask in the weight's shape; may update the layer's weight in place."""


def layer_by_layer(
    model: nn.Module,
    targets: list[str],
    data: Iterable[Any] | None,
    *,
    criterion: str,
    options: Calibration,
    hessian: bool,
    solve: Solve,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Prune ``targets`` in the order the model calls them, each from statistics of its inputs after the layers
    before it are pruned; ``solve`` decides one target's mask. Returns the keep-masks."""
    modules = target_modules(model, targets, criterion)
    sharded = isinstance(data, distributed.Sharded)
    batches = calibration_inputs(data, options.batches, model_device(model), criterion)
    blocks = _blocks(model, targets)
    masks: dict[str, Tensor] = {}
    with _calibrating(model):
        order, chain = _call_order(model, modules, blocks, batches[0])
        stages = _stages(order, blocks)
        cache: list[tuple[tuple, dict]] | None = None  # the current block's inputs, per batch
        for i, (block, names) in enumerate(bar(stages, "calibrating", enabled=progress)):
            if block is None or not chain:  # full passes (a block's targets still from one pass, together)
                cache = None
                with _watching({f: modules[f] for f in names}, hessian, sharded) as stats:
                    for inputs in batches:
                        _call(model, inputs)
                masks.update({f: solve(f, modules[f], stats[f]) for f in names})
                continue
            module = model.get_submodule(block)
            if cache is None:
                cache = _capture(model, module, batches)
            with _watching({f: modules[f] for f in names}, hessian, sharded) as stats:
                for args, kwargs in cache:
                    module(*args, **kwargs)
            masks.update({f: solve(f, modules[f], stats[f]) for f in names})
            nxt = stages[i + 1][0] if i + 1 < len(stages) else None
            if nxt is not None and blocks.index(nxt) == blocks.index(block) + 1:
                cache = [((_first(module(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in cache]
            else:
                cache = None
    return masks


def _stages(order: list[str], blocks: list[str]) -> list[tuple[str | None, list[str]]]:
    """Targets grouped into stages in call order: all targets of one block together, every other target alone."""
    stages: list[tuple[str | None, list[str]]] = []
    for f in order:
        block = next((b for b in blocks if f.startswith(f"{b}.")), None)
        if block is not None and stages and stages[-1][0] == block:
            stages[-1][1].append(f)
        else:
            stages.append((block, [f]))
    return stages


def _capture(model: nn.Module, block: nn.Module, batches: list[Any]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``block`` is called with on each batch; each forward pass stops there."""
    captured: list[tuple[tuple, dict]] = []

    def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for inputs in batches:
            try:
                _call(model, inputs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def one_pass(
    model: nn.Module,
    targets: list[str],
    data: Iterable[Any] | None,
    *,
    criterion: str,
    options: Calibration,
    hessian: bool,
) -> dict[str, Statistics]:
    """Every target's input statistics from forward passes of the model as it is (no pruning in between)."""
    modules = target_modules(model, targets, criterion)
    batches = calibration_inputs(data, options.batches, model_device(model), criterion)
    with _calibrating(model), _watching(modules, hessian, isinstance(data, distributed.Sharded)) as stats:
        for inputs in batches:
            _call(model, inputs)
    return stats


def check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise RegrowError(
            f"the calibration inputs of target {name!r} hold NaN or infinite values; check the calibration data "
            "and the layers before it."
        )


class CalibratedCriterion:
    """A criterion that prunes layer by layer from calibration inputs. Subclasses give ``score`` (the one-pass
    importance of a weight matrix) and ``solve`` (one layer's keep-mask, updating its weight if they need)."""

    name = ""
    calibrated = True
    scope = "layer"  # what scope "global" means for it: nothing is ranked across layers
    hessian = False  # whether it needs XᵀX, not only the per-input norms

    def score(self, weight: Tensor, stats: Statistics, options: Calibration) -> Tensor:
        """Importance of each weight of an (outputs, inputs) matrix."""
        raise NotImplementedError

    def solve(
        self, name: str, module: nn.Module, stats: Statistics, spec: Any, sparsity: float | None,
        previous: Tensor | None, options: Calibration,
    ) -> Tensor:  # fmt: skip
        """One layer's keep-mask in the weight's shape (``previous``: its earlier mask, in the same shape)."""
        raise NotImplementedError

    def __call__(
        self,
        model: nn.Module,
        targets: list[str],
        data: Iterable[Any] | None = None,
        *,
        calibration: Calibration | None = None,
    ) -> dict[str, Tensor]:
        """Scores of the model as it is, from one set of forward passes (for sensitivity curves and custom use;
        :func:`regrow.prune` prunes layer by layer through :meth:`prune` instead)."""
        options = calibration or Calibration()
        stats = one_pass(model, targets, data, criterion=self.name, options=options, hessian=self.hessian)
        out = {}
        for f, s in stats.items():
            module = model.get_submodule(f.rpartition(".")[0])
            out[f] = from_matrix(module, self.score(to_matrix(module, module.weight.detach()), s, options))
        return out

    @torch.no_grad()
    def prune(
        self,
        model: nn.Module,
        spec: Any,
        data: Iterable[Any] | None,
        previous: dict[str, Tensor] | None = None,
        progress: bool = False,
    ) -> dict[str, Tensor]:
        """Keep-masks of ``spec`` (a :class:`~regrow.spec.PruneSpec`), layer by layer; weights updated in place."""
        per_target = spec.per_target(model)
        options = Calibration.of(spec.calibration)

        def solve(f: str, module: nn.Module, stats: Statistics) -> Tensor:
            sparsity = spec.sparsity if per_target is None else per_target[f]
            earlier = None if previous is None else previous[f].to(module.weight.device)
            return self.solve(f, module, stats, spec, sparsity, earlier, options)

        return layer_by_layer(
            model,
            spec.targets,
            data,
            criterion=self.name,
            options=options,
            hessian=self.hessian,
            solve=solve,
            progress=progress,
        )
