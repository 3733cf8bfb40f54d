"""Structured pruning that makes models really smaller: channels and attention heads are removed.

``shrink`` is what ``regrow.prune(model, pattern="channel" | "head" | "channel+head", ...)`` runs:

1. every ``nn.MultiheadAttention`` is swapped for regrow's equivalent with prunable heads, and torchvision's
   Swin and MaxViT attention, Swin's patch merging, ShuffleNetV2's block and timm's attention modules that
   merge their heads with their input's width (EVA, BEiT, Swin V2 and V2 CR, relative-position ViT, PVT v2,
   CaiT, DaViT, Twins, XCiT, EdgeNeXt, NesT) for stand-ins that channel pruning can follow, each compared with
   its original on the example batch (regrow.structural.standins);
2. the coupled groups are found (channels: torch-pruning's dependency graph, with regrow's corrections for
   channels-last layouts and its units of channels that can only go together; heads: attention modules);
3. the groups are probed: a few units of each are removed on a copy and checked against the simulation
   (all groups at once, then halves of a failing set), and a group regrow cannot shrink correctly is left
   out with the reason;
4. units are scored (magnitude, taylor, bn_scale, random) and the budget is met by bisection;
5. the removal is simulated with masks, the model is shrunk, and the outputs must match (the equivalence
   check, always on); a mismatch raises an error naming the group.

Everything that runs the model to decide (tracing, probes, budget candidates, the check) runs on a CPU copy
when the model is elsewhere, in exact float32 (regrow.structural.device): a wrong surgery never reaches the
GPU, and the same weights give the same groups on every device. The model itself is shrunk once, at the end.

Steps 1-3 and the scoring are :func:`prepare` (its steps: regrow.structural.prepared); the budget search,
step 5 and the report are the rest of :func:`shrink` (regrow.structural.shrinking). Both entry points live
here and hand ``compare`` and ``compare_latency`` down to the steps, looked up in this module at call time:
tests replace them here.
"""

from __future__ import annotations

# Imports written "name as name" are re-exports: names other code takes from this package, not used here.
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from regrow.batches import model_device
from regrow.errors import SpeedWarning
from regrow.measure.latency import compare_latency
from regrow.select import resolve_targets
from regrow.structural.arch import load, save
from regrow.structural.attention import MultiheadAttention, convert_attention
from regrow.structural.budget import TOLERANCE, select
from regrow.structural.budget import SearchResult as SearchResult
from regrow.structural.budget import Unitized as Unitized
from regrow.structural.budget import check_reachable as check_reachable
from regrow.structural.budget import search as search
from regrow.structural.device import drop_autograd_caches, host_copy
from regrow.structural.device import exact_arithmetic as exact_arithmetic
from regrow.structural.graph import find_attention
from regrow.structural.options import (
    MAX_SPARSITY,
    STRUCTURAL_PATTERNS,
    _check_options,
    _check_selection,
    check_structural_budget,
    check_within,
    has_channels,
    has_heads,
)
from regrow.structural.prepared import (
    Prepared,
    _channel_groups,
    _example_inputs,
    _head_groups,
    _host_inputs,
    _one_sample,
    _probe_units,
    _score_units,
    _taylor_gradients,
    split_entries,
)
from regrow.structural.prepared import validate_request as validate_request
from regrow.structural.report import StructureReport
from regrow.structural.rounding import AUTO_ROUND_TO as AUTO_ROUND_TO
from regrow.structural.rounding import ROUND_MIN_CHANNELS as ROUND_MIN_CHANNELS
from regrow.structural.rounding import auto_round_to
from regrow.structural.shrinking import LATENCY_ROUNDS as LATENCY_ROUNDS
from regrow.structural.shrinking import LATENCY_TOLERANCE as LATENCY_TOLERANCE
from regrow.structural.shrinking import (
    _apply_allocation,
    _Baseline,
    _Budget,
    _note_vacuous_check,
    _recalibrate,
    _remove_checked,
    _report,
)
from regrow.structural.simulate import Equivalence as Equivalence
from regrow.structural.simulate import compare
from regrow.structural.simulate import simulate as simulate
from regrow.structural.standins import convert_standins
from regrow.structural.undo import _hands_back_on_failure
from regrow.structural.units import _Unit


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
    within: str | None = None,
) -> Prepared:
    """Find, probe and score the prunable groups of ``model`` (converting its attention; nothing removed).

    ``round_widths`` (group name -> channels) are the widths that decide which groups the default rounding
    applies to; iterative schedules pass the widths from before their first round, so that a group keeps
    the same rounding in every round. Default: the groups' current widths.
    """
    _check_options(pattern, criterion, round_to)
    check_within(model, within)
    device = model_device(model)
    inputs = _example_inputs(data, example_inputs, device)
    model.eval()
    converted = convert_attention(model)
    standins = convert_standins(model, inputs)
    drop_autograd_caches(model)  # the user's own passes may have filled them; the CPU copy copies the model
    host = host_copy(model)  # tracing, probes, scores and checks run on the CPU (regrow.structural.device)
    host_inputs = _host_inputs(model, host, inputs)
    graph, groups = _groups(host, pattern, host_inputs, targets, ignore, within)
    drop_autograd_caches(host)  # the trace ran with autograd on; probes copy the model
    units = [_Unit(g, graph) for g in groups]
    _probe_units(host, units, host_inputs, pattern, compare)
    if criterion == "taylor":
        _taylor_gradients(model, host, data)
        drop_autograd_caches(model)
        drop_autograd_caches(host)
    scored = _score_units(host, units, criterion, round_to, auto_round_to(device), round_widths)
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
        host.zero_grad(set_to_none=True)
    active = [u for u in units if u.group.excluded is None]
    one = _one_sample(inputs)
    return Prepared(pattern, criterion, units, active, scored, inputs, one, converted, standins, host, host_inputs)


def _groups(
    host: nn.Module, pattern: str, inputs: Any, targets: Any, ignore: Any, within: str | None
) -> tuple[Any, list[Any]]:
    """The dependency graph (None without channels) and the prunable groups of ``pattern`` inside ``within``.

    With ``"channel+head"``, entries of ``targets`` / ``ignore`` that name attention modules choose the modules
    whose heads go (default: every one), the other entries the weights whose channels go (default: the default
    targets)."""
    attention = find_attention(host)
    inside = {n: m for n, m in attention.items() if within is None or n.startswith(f"{within}.")}
    head_targets, head_ignore, channel_targets, channel_ignore = targets, ignore, targets, ignore
    if pattern == "channel+head":
        params = [n for n, _ in host.named_parameters()]
        head_targets, channel_targets = split_entries(targets, inside, params)
        head_ignore, channel_ignore = split_entries(ignore, inside, params)
    defaulted = channel_targets is None
    if within is not None and channel_targets is None:
        channel_targets = [f for f in resolve_targets(host, None, channel_ignore) if f.startswith(f"{within}.")]
    graph, groups = None, []
    heads_too = pattern == "channel+head" and defaulted  # the attention projections are the heads' then
    mlps = _mlp_only(host, attention, channel_targets, channel_ignore, heads_too) if has_channels(pattern) else None
    if mlps is not None:  # every target is an FFN projection: its channels need no traced graph
        groups = list(mlps)
    elif has_channels(pattern):
        graph, groups = _channel_groups(host, attention, inputs, channel_targets, channel_ignore)
        for g in groups if within is not None else []:
            outside = [m for m in g.members if not m.startswith(f"{within}.")]
            if outside and g.excluded is None:
                g.excluded = f"it reaches outside {within!r} ({outside[0]}), which the budget does not count"
    if has_heads(pattern):
        groups = groups + _head_groups(host, inside, head_targets, head_ignore)
    return graph, groups


def _mlp_only(
    host: nn.Module, attention: dict[str, nn.Module], targets: Any, ignore: Any, heads_too: bool
) -> list[Any] | None:
    """The FFN groups (``regrow.structural.mlp``) when every channel target is an FFN projection, else None. With
    ``heads_too`` (``"channel+head"`` and default targets) the attention projections are left to the heads."""
    from regrow.structural.heads import head_group
    from regrow.structural.mlp import mlp_groups

    resolved = resolve_targets(host, targets, ignore)
    if heads_too:
        inner = {f"{p}.weight" for n, m in attention.items() for p in head_group(n, m, host).members}
        resolved = [f for f in resolved if f not in inner]
    return mlp_groups(host, resolved)


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
    within: str | None = None,
) -> StructureReport:
    """Remove channels (``pattern="channel"``), attention heads (``pattern="head"``) or both against one budget
    (``pattern="channel+head"``) in place.

    ``within`` (a submodule's name, e.g. ``"encoder"``): only channels and heads inside it are removed, and a
    ``macs`` / ``params`` budget is the fraction of that submodule's MACs / parameters to keep.

    With ``recalibrate`` (default) and ``data``, BatchNorm statistics are re-estimated on a few batches
    after the removal (regrow.structural.batchnorm).

    ``allocation`` (group name -> relative sparsity, e.g. from regrow.allocation) shapes how much each
    group gives up; the budget then scales it (``scope`` is ignored). ``latency`` is a budget on the
    measured forward latency (fraction to keep), met within 5 % (measurements are noisy).
    ``round_widths``: see :func:`prepare`.

    When it raises (a budget that cannot be met, targets that match nothing, a failed equivalence check),
    ``model`` is handed back as it came, as the same objects: its modules (``nn.MultiheadAttention``
    and the torchvision modules stand-ins replace included), parameters, buffers, hooks and train/eval mode.
    """
    _check_options(pattern, criterion, round_to)
    kind, target = check_structural_budget(sparsity, macs, params, threshold, latency)
    _check_selection(scope, max_sparsity)
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
        within=within,
    )
    scored, scope = _apply_allocation(prepared, allocation, scope)
    budget = _Budget(kind, target, scope, max_sparsity, within)
    baseline = _Baseline.of(prepared.host, prepared.host_one, scored, within)
    options = (round_to, round_widths)
    done = _remove_checked(model, prepared, scored, budget, baseline, options, compare, compare_latency)
    _note_vacuous_check(done.eq, done.choice.notes)
    recalibrated = _recalibrate(model, data, recalibrate, prepared.units, done.choice.removed)
    model.train(was_training)
    report = _report(
        model, done.checked, done.prepared, budget, done.baseline, done.choice, done.eq, recalibrated, round_to
    )
    for w in report.warnings[len(done.choice.notes) :]:
        warnings.warn(w, SpeedWarning, stacklevel=4)  # shrink <- structural_masks <- prune <- the caller
    return report


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
