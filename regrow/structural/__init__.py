"""Structured pruning that makes models really smaller: channels and attention heads are removed.

``shrink`` is what ``regrow.prune(model, pattern="channel" | "head", ...)`` runs:

1. every ``nn.MultiheadAttention`` is swapped for regrow's equivalent with prunable heads;
2. the coupled groups are found (channels: torch-pruning's dependency graph; heads: attention modules);
3. each group is probed: one unit is removed on a copy and checked against its simulation, and a group
   regrow cannot shrink correctly is left out with the reason;
4. units are scored (magnitude, taylor, bn_scale, random) and the budget is met by bisection;
5. the removal is simulated with masks, the model is shrunk in place, and the outputs must match
   (the equivalence check, always on); a mismatch raises an error naming the group.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from regrow.batches import model_device, to_device, unpack
from regrow.errors import RegrowError, SpeedWarning
from regrow.measure.cost import count_params, dense_macs
from regrow.measure.latency import compare_latency
from regrow.select import resolve_targets
from regrow.structural.arch import load, retie, save, tied_parameters
from regrow.structural.attention import MultiheadAttention, convert_attention
from regrow.structural.batchnorm import has_batchnorm, recalibrate_batchnorm
from regrow.structural.budget import TOLERANCE, SearchResult, Unitized, check_reachable, search, select
from regrow.structural.graph import ChannelGroup, Cut, StructureGraph, apply_cuts, find_attention
from regrow.structural.heads import HeadGroup, head_group
from regrow.structural.importance import GROUP_CRITERIA, accumulate_gradients, channel_scores, head_scores
from regrow.structural.simulate import Equivalence, compare, simulate

log = logging.getLogger("regrow")
STRUCTURAL_PATTERNS = ("channel", "head")
MAX_SPARSITY = 0.9
LATENCY_ROUNDS = 15  # interleaved forward passes per latency measurement of a budget candidate
LATENCY_TOLERANCE = 0.05
# Default rounding: kept widths of groups with at least ROUND_MIN_CHANNELS channels become multiples of the
# channel block of the device's fastest dense kernels (auto_round_to). On CPUs oneDNN stores activations in
# blocks of 16 channels with AVX-512 and of 8 with AVX2, so a width between two multiples costs as much as the
# next one up: on an AVX-512 CPU, 3x3 convs at 14x14 took as long with 24 channels as with 32, with 40 as with
# 48. benchmarks/structural_speed.py times the rounding side by side on the reference ResNet at half the MACs.
AUTO_ROUND_TO = 8
ROUND_MIN_CHANNELS = 32


def auto_round_to(device: torch.device | str | None = None) -> int:
    """The default ``round_to`` for a model on ``device``: 16 on CPUs with AVX-512, else 8."""
    if device is not None:
        device = torch.device(device)
    if device is None or device.type == "cpu":
        capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
        if str(capability).upper().startswith("AVX512"):
            return 16
    return AUTO_ROUND_TO


@dataclass
class StructureReport:
    """What a structural prune removed, what it achieved, and the equivalence check's result."""

    pattern: str
    criterion: str
    scope: str
    budget: dict[str, float]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    units_total: int
    units_removed: int
    groups: list[dict[str, Any]]
    equivalence: Equivalence
    converted_attention: list[str] = field(default_factory=list)
    evaluations: int = 0
    warnings: list[str] = field(default_factory=list)
    recalibrated_batches: int = 0
    round_to: int | None = None  # channel pattern: the multiple kept widths were rounded to
    round_to_auto: bool = False  # the device default, applied to groups of ROUND_MIN_CHANNELS channels or more

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["equivalence"] = self.equivalence.to_dict()
        out["macs_ratio"] = self.macs_ratio
        out["params_ratio"] = self.params_ratio
        return out


def check_structural_budget(
    sparsity: float | None,
    macs: float | None,
    params: float | None,
    threshold: float | None,
    latency: float | None = None,
) -> tuple[str, float]:
    if threshold is not None:
        raise RegrowError("structural patterns take sparsity=, macs=, params= or latency=, not threshold=.")
    given = {
        k: v
        for k, v in (("sparsity", sparsity), ("macs", macs), ("params", params), ("latency", latency))
        if v is not None
    }
    if len(given) != 1:
        raise RegrowError(
            "give exactly one budget for a structural pattern: sparsity (fraction of channels or heads removed, "
            "in [0, 1)), macs (fraction of MACs to keep, in (0, 1]), params (fraction of parameters to keep, "
            f"in (0, 1]) or latency (fraction of the measured latency to keep, in (0, 1]); got "
            f"{', '.join(given) or 'none'}."
        )
    kind, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RegrowError(f"{kind} must be a number; got {value!r}.")
    if kind == "sparsity" and not 0.0 <= value < 1.0:
        raise RegrowError(
            f"sparsity must be a number in [0, 1) (the fraction of channels or heads removed); got {value!r}."
        )
    what = {"macs": "MACs", "params": "parameters", "latency": "measured latency"}.get(kind, kind)
    if kind != "sparsity" and not 0.0 < value <= 1.0:
        raise RegrowError(f"{kind} must be in (0, 1]: the fraction of the model's {what} to keep; got {value!r}.")
    return kind, float(value)


def _example_inputs(data: Iterable[Any] | None, example_inputs: Any, device: torch.device) -> Any:
    if example_inputs is None:
        if data is None:
            raise RegrowError(
                "structural patterns trace the model and need inputs: pass data= (batches of (inputs, targets)) "
                "or example_inputs=."
            )
        for batch in data:
            example_inputs, _ = unpack(batch)
            break
        else:
            raise RegrowError(
                "the data iterable is empty; structural pruning needs one batch of inputs to trace the model."
            )
    return to_device(example_inputs, device)


def _one_sample(inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return {k: v[:1] for k, v in inputs.items()}
    return inputs[:1]


class _Unit:
    """A channel group or a head group behind one interface: cut on a model, simulate on a copy."""

    def __init__(self, group: ChannelGroup | HeadGroup, graph: StructureGraph | None) -> None:
        self.group = group
        self.graph = graph

    @property
    def name(self) -> str:
        return self.group.name

    def cuts(self, removed: list[int]) -> list[Cut]:
        if isinstance(self.group, ChannelGroup) and removed:
            assert self.graph is not None
            return self.graph.cuts(self.group, removed)
        return []

    def heads(self, removed: list[int]) -> list[tuple[HeadGroup, list[int]]]:
        return [(self.group, removed)] if isinstance(self.group, HeadGroup) and removed else []


def _apply(model: nn.Module, units: list[_Unit], removed: dict[str, list[int]]) -> None:
    cuts = [c for u in units for c in u.cuts(removed.get(u.name, []))]
    apply_cuts(model, cuts)
    for u in units:
        for group, heads in u.heads(removed.get(u.name, [])):
            group.apply(model, heads)


def _check(model: nn.Module, units: list[_Unit], removed: dict[str, list[int]], inputs: Any) -> Equivalence:
    """Simulate on one copy, shrink another copy, compare."""
    cuts = [c for u in units for c in u.cuts(removed.get(u.name, []))]
    heads = [h for u in units for h in u.heads(removed.get(u.name, []))]
    simulated = simulate(model, cuts, heads)
    shrunk = copy.deepcopy(model)
    _apply(shrunk, units, removed)
    return compare(shrunk, simulated, inputs)


def _breaks_ties(model: nn.Module, unit: _Unit, ties: list[list[tuple[str, str]]]) -> str | None:
    """Why the group cannot be shrunk when removing one of its units changes only one side of a tied
    parameter (an embedding tied to the output layer whose two widths belong to different groups)."""
    if not ties:
        return None
    trial = copy.deepcopy(model)
    _apply(trial, [unit], {unit.name: [0]})
    for group in ties:
        shapes = {f"{m}.{p}": tuple(trial.get_submodule(m)._parameters[p].shape) for m, p in group}
        if len(set(shapes.values())) > 1:
            return f"it would untie {' from '.join(shapes)}, changing the shape of only one of them"
    return None


def _probe(model: nn.Module, unit: _Unit, inputs: Any) -> str | None:
    """Remove one unit on a copy; the reason the group cannot be handled, or None when it can."""
    try:
        eq = _check(model, [unit], {unit.name: [0]}, inputs)
    except RegrowError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure means regrow cannot shrink this group correctly
        return f"shrinking it breaks the forward pass ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if not eq.passed:
        return f"the shrunk layers do not match their simulation (max difference {eq.max_abs_diff:.3g})"
    return None


def _head_candidates(attention: dict[str, nn.Module], targets: Any, ignore: Any) -> set[str]:
    from fnmatch import fnmatchcase

    names = set(attention)
    chosen = set(names)
    if targets is not None:
        entries = [targets] if isinstance(targets, str) else list(targets)
        chosen = set()
        for entry in entries:
            hits = {n for n in names if fnmatchcase(n, entry)}
            if not hits:
                raise RegrowError(
                    f"targets entry {entry!r} matches no attention module; attention modules: {sorted(names)}."
                )
            chosen |= hits
    for entry in [ignore] if isinstance(ignore, str) else list(ignore or []):
        hits = {n for n in names if fnmatchcase(n, entry)}
        if not hits:
            raise RegrowError(
                f"ignore entry {entry!r} matches no attention module; attention modules: {sorted(names)}."
            )
        chosen -= hits
    return chosen


def validate_request(model: nn.Module, pattern: str, targets: Any = None, ignore: Any = None) -> None:
    """Check names against the model before any work (no tracing): targets, ignore, attention modules."""
    if pattern == "channel":
        resolve_targets(model, targets, ignore)
        return
    attention = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    attention.update(find_attention(model))
    if not attention:
        raise RegrowError(
            "pattern 'head' found no attention module: regrow prunes heads of nn.MultiheadAttention and of "
            "modules that declare num_heads (or num_attention_heads, n_heads, n_head)."
        )
    _head_candidates(attention, targets, ignore)


@dataclass
class Prepared:
    """The prunable groups of one model, probed and scored: what budgets and sensitivity work from."""

    pattern: str
    criterion: str
    units: list[_Unit]
    active: list[_Unit]
    scores: list[Unitized]
    inputs: Any
    one: Any
    converted: list[str]

    def apply(self, model: nn.Module, removed: dict[str, list[int]]) -> None:
        """Shrink ``model`` (this model or a copy of it) by removing the given units of each group."""
        _apply(model, self.active, removed)


def _check_options(pattern: str, criterion: str, round_to: int | None) -> None:
    if pattern not in STRUCTURAL_PATTERNS:
        raise RegrowError(f"unknown structural pattern {pattern!r}; allowed values: {', '.join(STRUCTURAL_PATTERNS)}.")
    if criterion not in GROUP_CRITERIA:
        raise RegrowError(
            f"unknown criterion {criterion!r} for pattern {pattern!r}; allowed values: {', '.join(GROUP_CRITERIA)}."
        )
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise RegrowError(f"round_to must be a positive integer (e.g. 8); got {round_to!r}.")


def prepare(
    model: nn.Module,
    *,
    pattern: str,
    criterion: str = "magnitude",
    targets: Any = None,
    ignore: Any = None,
    data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    round_to: int | None = None,
    round_widths: dict[str, int] | None = None,
) -> Prepared:
    """Find, probe and score the prunable groups of ``model`` (converting its attention; nothing removed).

    ``round_widths`` (group name -> channels) are the widths that decide which groups the default rounding
    applies to; iterative schedules pass the widths from before their first round, so that a group keeps
    the same rounding in every round. Default: the groups' current widths.
    """
    _check_options(pattern, criterion, round_to)
    device = model_device(model)
    inputs = _example_inputs(data, example_inputs, device)
    model.eval()
    converted = convert_attention(model)
    attention = find_attention(model)

    graph = None
    auto = auto_round_to(device)
    if pattern == "channel":
        fqns = resolve_targets(model, targets, ignore)
        candidates = {f.rpartition(".")[0] if f.endswith(".weight") else f for f in fqns}
        ignored = set()
        if ignore is not None:
            ignored = {f.rpartition(".")[0] for f in resolve_targets(model, ignore)}
        graph = StructureGraph(model, inputs)
        inner = {}
        for name, module in attention.items():
            hg = head_group(name, module, model)
            inner[name] = {fqn for role, fqn in hg.projections.items() if role != "out"}
        groups: list[ChannelGroup | HeadGroup] = list(graph.channel_groups(candidates, ignored, inner))
    else:
        chosen = _head_candidates(attention, targets, ignore)
        if not attention:
            raise RegrowError(
                "pattern 'head' found no attention module: regrow prunes heads of nn.MultiheadAttention and of "
                "modules that declare num_heads (or num_attention_heads, n_heads, n_head)."
            )
        groups = []
        for name in sorted(attention):
            g = head_group(name, attention[name], model)
            if name not in chosen:
                g.excluded = g.excluded or "not a target"
            elif g.heads < 2 and g.excluded is None:
                g.excluded = "it has a single head"
            groups.append(g)

    units = [_Unit(g, graph) for g in groups]
    ties = tied_parameters(model)
    for u in units:
        if u.group.excluded is None:
            u.group.excluded = _probe(model, u, inputs) or _breaks_ties(model, u, ties)
    if not any(u.group.excluded is None for u in units):
        reasons = "; ".join(f"{u.name}: {u.group.excluded}" for u in units if u.group.excluded != "not a target")
        raise RegrowError(
            f"no group can be pruned with pattern {pattern!r}" + (f" ({reasons})" if reasons else "") + "."
        )

    if criterion == "taylor":
        accumulate_gradients(model, data)
    scored = []
    for u in units:
        if u.group.excluded is not None:
            continue
        if isinstance(u.group, ChannelGroup):
            s = channel_scores(u.group, criterion)
            if s is None:
                u.group.excluded = f"criterion {criterion!r} finds nothing to score in it"
                continue
            step = _round_step(u.group, round_to, auto, round_widths)
        else:
            s = head_scores(u.group, model, criterion)
            step = 1
        scored.append(Unitized(u.name, u.group.units, s, step))
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
    active = [u for u in units if u.group.excluded is None]
    return Prepared(pattern, criterion, units, active, scored, inputs, _one_sample(inputs), converted)


class _Undo:
    """Everything ``shrink`` may change, kept so that a failure can put it back: every module's attributes
    (its submodules, parameters, buffers, hooks and train/eval mode, as the very objects the caller holds) and
    the data of every parameter and buffer. The surgery replaces these rather than editing them, so keeping
    references costs no copy."""

    NESTED = ("_parameters", "_buffers", "_modules")

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, self._copy(m.__dict__)) for m in model.modules()]
        self.data = [
            (t, t.data)
            for m, _ in self.modules
            for t in [*m._parameters.values(), *m._buffers.values()]
            if t is not None
        ]

    def restore(self) -> None:
        for module, attributes in self.modules:
            module.__dict__.clear()
            module.__dict__.update(self._copy(attributes))
        for tensor, data in self.data:
            tensor.data = data

    @classmethod
    def _copy(cls, attributes: dict[str, Any]) -> dict[str, Any]:
        """The attributes, with their own copies of the dicts the surgery edits."""
        return {k: type(v)(v) if k in cls.NESTED else v for k, v in attributes.items()}


def _hands_back_on_failure(fn: Callable[..., StructureReport]) -> Callable[..., StructureReport]:
    """Run ``fn(model, ...)``; when it raises, put ``model`` back as it came (see :class:`_Undo`)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> StructureReport:
        undo = _Undo(model)
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            undo.restore()
            raise

    return wrapper


@_hands_back_on_failure
def shrink(
    model: nn.Module,
    *,
    pattern: str,
    sparsity: float | None = None,
    macs: float | None = None,
    params: float | None = None,
    latency: float | None = None,
    threshold: float | None = None,
    criterion: str = "magnitude",
    scope: str = "global",
    targets: Any = None,
    ignore: Any = None,
    data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    round_to: int | None = None,
    max_sparsity: float = MAX_SPARSITY,
    allocation: dict[str, float] | None = None,
    recalibrate: bool = True,
    round_widths: dict[str, int] | None = None,
) -> StructureReport:
    """Remove channels (``pattern="channel"``) or attention heads (``pattern="head"``) in place.

    With ``recalibrate`` (default) and ``data``, BatchNorm statistics are re-estimated on a few batches
    after the removal (regrow.structural.batchnorm).

    ``allocation`` (group name -> relative sparsity, e.g. from regrow.allocation) shapes how much each
    group gives up; the budget then scales it (``scope`` is ignored). ``latency`` is a budget on the
    measured forward latency (fraction to keep), met within 5 % (measurements are noisy).
    ``round_widths``: see :func:`prepare`.

    When it raises (a budget that cannot be met, targets that match nothing, a failed equivalence check),
    ``model`` is handed back as it came, as the same objects: its modules (``nn.MultiheadAttention``
    included), parameters, buffers, hooks and train/eval mode.
    """
    _check_options(pattern, criterion, round_to)
    kind, target = check_structural_budget(sparsity, macs, params, threshold, latency)
    if scope not in ("global", "layer"):
        raise RegrowError(f"unknown scope {scope!r}; allowed values: global, layer.")
    if not 0.0 < max_sparsity < 1.0:
        raise RegrowError(
            f"max_sparsity must be in (0, 1): the largest share of any group's units removed; got {max_sparsity!r}."
        )
    was_training = model.training
    prepared = prepare(
        model,
        pattern=pattern,
        criterion=criterion,
        targets=targets,
        ignore=ignore,
        data=data,
        example_inputs=example_inputs,
        round_to=round_to,
        round_widths=round_widths,
    )
    units, active, scored, inputs, one = prepared.units, prepared.active, prepared.scores, prepared.inputs, prepared.one
    if allocation is not None:
        unknown = sorted(set(allocation) - {u.name for u in units})
        if unknown:
            raise RegrowError(
                f"allocation names groups the model does not have: {unknown[:5]}; its groups are: "
                f"{', '.join(u.name for u in active)}."
            )
        scored = [Unitized(g.name, g.units, g.scores, g.step, allocation.get(g.name, 0.0)) for g in scored]
        scope = "allocation"

    notes: list[str] = []
    widths_before = _widths(model)
    macs_before = dense_macs(model, one) or 0
    params_before = count_params(model)[0]
    total_units = sum(g.units for g in scored)
    reference = copy.deepcopy(model) if kind == "latency" else None

    def measure(removed: dict[str, list[int]]) -> float:
        if kind == "sparsity":
            return sum(len(v) for v in removed.values()) / total_units
        trial = copy.deepcopy(model)
        _apply(trial, active, removed)
        if kind == "macs":
            value = dense_macs(trial, one)
            if value is None:
                raise RegrowError("MACs of a shrunk candidate could not be counted; use params= or sparsity= instead.")
            return value / macs_before
        if kind == "latency":
            before, after = compare_latency(reference, trial, inputs, rounds=LATENCY_ROUNDS)
            return after.median_ms / before.median_ms
        return count_params(trial)[0] / params_before

    auto = auto_round_to(model_device(model))
    used_round = (round_to if round_to is not None else auto) if pattern == "channel" else None
    if (kind == "sparsity" and target == 0.0) or (kind != "sparsity" and target == 1.0):
        result_removed, evaluations = {u.name: [] for u in active}, 0
    else:
        tolerance = LATENCY_TOLERANCE if kind == "latency" else TOLERANCE

        def run_search(groups: list[Unitized]) -> SearchResult:
            return search(
                groups, target, measure, scope, max_sparsity, tolerance=tolerance, decreasing=kind != "sparsity"
            )

        found = run_search(scored)
        evaluations = found.evaluations
        if not found.within_tolerance and round_to is None and pattern == "channel":
            # The default rounding is a preference, the budget a requirement: finer multiples before a miss.
            channel_groups = {u.name: u.group for u in active if isinstance(u.group, ChannelGroup)}
            for finer in (m for m in (AUTO_ROUND_TO, 1) if m < auto):
                retry = run_search(
                    [replace(g, step=_round_step(channel_groups[g.name], None, finer, round_widths)) for g in scored]
                )
                evaluations += retry.evaluations
                if retry.within_tolerance:
                    notes.append(
                        f"the default rounding (multiples of {auto}) could not meet the {kind} budget {target:g} "
                        f"within {100 * tolerance:g}%; kept widths are "
                        + (f"multiples of {finer} instead." if finer > 1 else "not rounded instead.")
                    )
                    log.warning(notes[-1])
                    found, used_round = retry, finer
                    break
        missed = check_reachable(found, target, kind, max_sparsity, tolerance)
        if missed:
            log.warning(missed)
            notes.append(missed)
        result_removed = found.removed
    reference = None  # free the copy kept for latency measurements

    # The equivalence check: simulate from the untouched model, then shrink the model itself.
    cuts = [c for u in active for c in u.cuts(result_removed.get(u.name, []))]
    heads = [h for u in active for h in u.heads(result_removed.get(u.name, []))]
    simulated = simulate(model, cuts, heads)
    before = copy.deepcopy(model)
    ties = tied_parameters(model)
    _apply(model, active, result_removed)
    retie(model, ties)  # the surgery gives every module its own new Parameter; tied ones share one again
    eq = compare(model, simulated, inputs)
    if not eq.passed:
        culprits = [
            u.name
            for u in active
            if result_removed.get(u.name) and not _check(before, [u], {u.name: result_removed[u.name]}, inputs).passed
        ]
        raise RegrowError(
            f"equivalence check failed: the shrunk model differs from its simulation by {eq.max_abs_diff:.3g} "
            f"(tolerance {eq.tolerance:.3g}); group(s) at fault: {', '.join(culprits) or 'an interaction of groups'}. "
            "Leave them out with ignore=[...]."
        )
    del simulated, before
    recalibrated = 0
    if recalibrate and data is not None and has_batchnorm(model) and any(result_removed.get(u.name) for u in units):
        recalibrated = recalibrate_batchnorm(model, data)
    model.train(was_training)

    group_rows = []
    for u in units:
        removed = result_removed.get(u.name, [])
        group_rows.append(
            {
                "name": u.name,
                "kind": "channels" if isinstance(u.group, ChannelGroup) else "heads",
                "members": u.group.members,
                "units_before": u.group.units,
                "units_after": u.group.units - len(removed),
                "unit_size": getattr(u.group, "ch_groups", 1),
                "channels_before": getattr(u.group, "channels", u.group.units),
                "excluded": u.group.excluded,
            }
        )
    warnings_list = notes + _width_warnings(model, round_to, pattern, widths_before, auto)
    report = StructureReport(
        pattern=pattern,
        criterion=criterion,
        scope=scope,
        budget={kind: target},
        macs_before=macs_before,
        macs_after=dense_macs(model, one) or 0,
        params_before=params_before,
        params_after=count_params(model)[0],
        units_total=total_units,
        units_removed=sum(len(v) for v in result_removed.values()),
        groups=group_rows,
        equivalence=eq,
        converted_attention=prepared.converted,
        evaluations=evaluations,
        warnings=warnings_list,
        recalibrated_batches=recalibrated,
        round_to=used_round,
        round_to_auto=pattern == "channel" and round_to is None,
    )
    for w in warnings_list[len(notes) :]:
        warnings.warn(w, SpeedWarning, stacklevel=4)  # shrink <- structural_masks <- prune <- the caller
    return report


def _round_step(group: ChannelGroup, round_to: int | None, auto: int, round_widths: dict[str, int] | None) -> int:
    """Kept units of ``group`` must be a multiple of this: ``round_to`` if given, else ``auto`` for groups of
    at least ROUND_MIN_CHANNELS channels (measured by ``round_widths`` when given) and no rounding for others."""
    width = (round_widths or {}).get(group.name, group.channels)
    multiple = round_to if round_to is not None else (auto if width >= ROUND_MIN_CHANNELS else 1)
    return multiple // math.gcd(multiple, group.ch_groups)


def _width_warnings(
    model: nn.Module, round_to: int | None, pattern: str, before: dict[str, int], auto: int = AUTO_ROUND_TO
) -> list[str]:
    """Layers that the prune left at a width that is not a multiple of 8 (and that were multiples before)."""
    if pattern != "channel" or (round_to is not None and round_to % 8 == 0):
        return []
    odd = []
    for name, m in model.named_modules():
        width = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        was = before.get(name, 0)
        # Narrow layers are not rounded by default: no point nagging about them.
        wide = was >= ROUND_MIN_CHANNELS or round_to is not None
        if (
            isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and width
            and width % 8
            and was % 8 == 0
            and wide
        ):
            odd.append(f"{name} ({width})")
    if not odd:
        return []
    shown = ", ".join(odd[:6]) + (f" and {len(odd) - 6} more" if len(odd) > 6 else "")
    return [
        f"layer widths that are not multiples of 8 run slower on most hardware: {shown}; pass round_to={auto} "
        "(the channel block of this device's dense kernels)."
    ]


def _widths(model: nn.Module) -> dict[str, int]:
    return {
        name: getattr(m, "out_channels", None) or getattr(m, "out_features", 0)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    }


__all__ = [
    "Prepared",
    "STRUCTURAL_PATTERNS",
    "MultiheadAttention",
    "StructureReport",
    "TOLERANCE",
    "auto_round_to",
    "load",
    "save",
    "select",
    "prepare",
    "shrink",
]
