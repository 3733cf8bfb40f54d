"""``regrow.prune``: score the targets, turn scores into masks, zero the pruned weights."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from regrow.criteria import CRITERIA, Calibration, is_calibrated
from regrow.criteria.base import lazy_map
from regrow.errors import RegrowError, SpeedWarning, one_of
from regrow.masks import MaskSet
from regrow.patterns import get_pattern
from regrow.ranking import count
from regrow.select import resolve_targets, transposed_targets
from regrow.spec import PruneSpec

SCOPES = ("global", "layer", "row")
STRUCTURAL = ("channel", "head", "channel+head")


def plan(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    threshold: float | None = None,
    pattern: str = "unstructured",
    criterion: str = "magnitude",
    scope: str = "global",
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    calibration: Calibration | dict[str, Any] | None = None,
) -> PruneSpec:
    """Validate a pruning request against a model without changing it.

    A calibrated criterion (``wanda``, ``sparsegpt``) prunes layer by layer, so nothing is ranked across
    layers: scope ``"global"`` (the default) becomes the criterion's own comparison group (``"row"`` for wanda,
    ``"layer"`` for sparsegpt, as their papers), and the spec records it.

    Raises:
        RegrowError: with one paragraph naming the bad argument and the allowed values.
    """
    pat = get_pattern(pattern)
    if criterion not in CRITERIA:
        raise one_of("criterion", criterion, CRITERIA.names())
    if scope not in SCOPES:
        raise one_of("scope", scope, SCOPES)
    fqns = resolve_targets(model, targets, ignore)
    flipped = transposed_targets(model, fqns)  # stored (inputs, outputs): the pattern sees (outputs, inputs)
    shapes = {f: model.get_parameter(f).shape for f in fqns}
    pat.check({f: s[::-1] if f in flipped else s for f, s in shapes.items()}, sparsity=sparsity, threshold=threshold)
    if sparsity is None and threshold is None:  # n:m: the pattern fixes the sparsity
        sparsity = 1 - pat.n / pat.m  # type: ignore[attr-defined]
    options = None
    if is_calibrated(criterion):
        scope = _calibrated_scope(criterion, scope, threshold)
        options = (calibration if isinstance(calibration, Calibration) else Calibration.of(calibration)).to_dict()
    elif calibration is not None:
        raise RegrowError(
            f"calibration settings are for the calibrated criteria (wanda, sparsegpt); criterion {criterion!r} "
            "takes none. Leave calibration out, or choose criterion 'wanda' or 'sparsegpt'."
        )
    return PruneSpec(pat.name, criterion, scope, sparsity, threshold, fqns, calibration=options)


def _calibrated_scope(criterion: str, scope: str, threshold: float | None) -> str:
    """The scope a calibrated criterion prunes at: its own for "global", else "layer" or "row" as asked."""
    if threshold is not None and criterion == "sparsegpt":
        raise RegrowError(
            "criterion 'sparsegpt' updates the weights it keeps, so its scores change while it prunes and a "
            "threshold on them means nothing; give sparsity= instead."
        )
    return CRITERIA.get(criterion).scope if scope == "global" else scope  # type: ignore[attr-defined]


def structural_masks(
    model: nn.Module,
    *,
    pattern: str,
    criterion: str = "magnitude",
    scope: str = "global",
    sparsity: float | None = None,
    macs: float | None = None,
    params: float | None = None,
    dense: nn.Module | None = None,
    **options: Any,
) -> MaskSet:
    """``regrow.structural.shrink`` wrapped as :func:`prune` returns it: an empty MaskSet carrying the report.

    ``dense``: the frozen copy kept as ``MaskSet.dense``. ``options`` go to ``shrink`` as they are; the
    pipeline's iterative schedules pass ``round_widths`` here.
    """
    from regrow.structural import shrink

    if options.pop("calibration", None) is not None:
        raise RegrowError(
            f"calibration settings are for the calibrated criteria (wanda, sparsegpt), which prune single weights; "
            f"pattern {pattern!r} removes whole channels or heads. Leave calibration out."
        )
    report = shrink(
        model, pattern=pattern, criterion=criterion, scope=scope, sparsity=sparsity, macs=macs, params=params, **options
    )
    within = options.get("within")
    spec = PruneSpec(
        pattern,
        criterion,
        scope,
        sparsity,
        None,
        [g["name"] for g in report.groups if g["excluded"] is None],
        macs=macs,
        params=params,
        within=within,
    )
    return MaskSet({}, spec=spec, dense=dense, structure=report)


def compute_masks(
    model: nn.Module,
    spec: PruneSpec,
    data: Iterable[Any] | None = None,
    previous: MaskSet | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Masks for ``spec`` on the model's current weights (a calibrated criterion also updates the weights:
    sparsegpt's reconstruction; ``progress``: its bar over the layers).

    With ``previous``, weights pruned before stay pruned (their score is set to -inf), so a schedule that
    raises the sparsity step by step only ever removes more.
    """
    criterion = CRITERIA.get(spec.criterion)
    if is_calibrated(spec.criterion):  # layer by layer: each layer's mask depends on the ones before it
        before = None if previous is None else dict(previous.items())
        # several processes: each rank calibrates on its part of every batch; the statistics are summed over them
        masks = criterion.prune(model, spec, data, previous=before, progress=progress)  # type: ignore[attr-defined]
        return masks if previous is None else {f: m & previous[f].to(m.device) for f, m in masks.items()}
    scores = criterion(model, spec.targets, data)
    if previous is not None:
        scores = lazy_map(scores, lambda f, s: s.masked_fill(~previous[f].to(s.device), float("-inf")))
    pattern = get_pattern(spec.pattern)
    per_target = spec.per_target(model)
    if per_target is not None:  # an allocation: each target at its own sparsity
        masks = {}
        for f, s in scores.items():
            scope = "row" if spec.scope == "row" else "layer"
            masks.update(pattern_masks(model, pattern, {f: s}, sparsity=per_target[f], threshold=None, scope=scope))
    else:
        cap = spec.global_cap()  # global ranking: no target emptied or left far sparser than the rest
        masks = pattern_masks(
            model, pattern, scores, sparsity=spec.sparsity, threshold=spec.threshold, scope=spec.scope,
            **({"cap": cap} if cap else {}),
        )  # fmt: skip
    if previous is not None:
        masks = {f: m & previous[f].to(m.device) for f, m in masks.items()}
    return masks


def pattern_masks(model: nn.Module, pattern: Any, scores: Mapping[str, Tensor], **budget: Any) -> dict[str, Tensor]:
    """``pattern.make_masks(scores, **budget)``, with the targets stored (inputs, outputs) (GPT-2's Conv1D) seen
    as (outputs, inputs), so that n:m groups run along their inputs and ``row`` scope along their outputs."""
    flipped = transposed_targets(model, scores)
    if flipped:
        scores = lazy_map(scores, lambda f, s: s.t() if f in flipped else s)
    masks = pattern.make_masks(scores, **budget)
    return {f: m.t().contiguous() if f in flipped else m for f, m in masks.items()}


def speed_warning(pattern: str) -> str:
    return (
        f"pattern {pattern!r} cannot make dense kernels faster: expect smaller files, not lower latency; "
        "use pattern 'channel', 'head' or 'channel+head' for speed."
    )


def frozen_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy in eval mode with gradients off (the dense teacher), or None if it cannot be copied."""
    try:
        dense = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any deepcopy failure only costs the default teacher
        warnings.warn(
            f"could not copy the model before pruning ({exc}); distillation will need teacher=.", stacklevel=3
        )
        return None
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense


def prune(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    threshold: float | None = None,
    pattern: str = "unstructured",
    criterion: str = "magnitude",
    scope: str = "global",
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    data: Iterable[Any] | None = None,
    keep_dense: bool = True,
    macs: float | None = None,
    params: float | None = None,
    round_to: int | None = None,
    max_sparsity: float | None = None,
    example_inputs: Any = None,
    latency: float | None = None,
    allocation: dict[str, float] | None = None,
    recalibrate: bool = True,
    calibration: Calibration | dict[str, Any] | None = None,
    within: str | None = None,
    progress: bool = True,
) -> MaskSet:
    """Prune ``model`` in place and return the keep-masks.

    Args:
        model: a trained model; its pruned weights become exactly zero (structural patterns: are removed).
        sparsity: fraction of target weights to zero, in [0, 1) (structural: of channels or heads removed);
            or ``threshold``, or (structural) ``macs`` / ``params`` / ``latency``.
        threshold: zero every target weight whose score is below this value.
        pattern: ``"unstructured"``, an n:m pattern such as ``"2:4"``, ``"channel"``, ``"head"``, ``"channel+head"``.
        criterion: ``"magnitude"``, ``"random"``, ``"taylor"`` (needs ``data``); ``"channel"`` also ``"bn_scale"``;
            masks also ``"wanda"``, ``"sparsegpt"`` (layer by layer from ``data``). See ``regrow list``.
        scope: ``"global"`` (one ranking over all targets), ``"layer"`` or ``"row"`` (same sparsity per target or
            output row). Calibrated criteria: ``"global"`` means their own (wanda: row, sparsegpt: layer).
        targets, ignore: fqns or globs of parameters to prune / to leave (``"head"``: attention modules). Default:
            the weights of all Linear/Conv layers but the final classifier (the last one registered).
        data: an iterable of ``(inputs, targets)`` batches, for data-driven criteria and for tracing.
        keep_dense: keep a frozen copy of the model from before pruning in ``MaskSet.dense`` (the default teacher).
        macs / params: structural budgets: the fraction of MACs / parameters to keep, in (0, 1], reached
            within 2 % (relative); units too coarse for that: the closest selection within 10 %, with a warning.
        round_to: structural: round kept channel counts down to a multiple of this; a group narrower than
            one multiple (by default: than 32 channels) is not rounded. Default: the channel block of the
            device's fastest dense kernels, 16 on CPUs with AVX-512 and 8 elsewhere (``auto_round_to``);
            when it misses the budget by over 2 %, 8 and then no rounding are tried (the report says so).
        max_sparsity: the largest share removed from any group (structural; default 0.9) or target (default:
            0.99, and with scope global, 1 - half the overall density if that is less; ``PruneSpec``).
        example_inputs, latency: structural: inputs to trace with (default: ``data``'s first batch); a budget
            on the measured latency (the fraction to keep, within 5 %).
        recalibrate, allocation: structural: re-estimate BatchNorm statistics on a few batches of ``data`` (Li et
            al. 2020); relative per-target (structural: per-group) sparsities (``regrow.allocate``), scaled to fit.
        calibration, progress, within: wanda / sparsegpt settings (``Calibration`` or a dict) and a bar over the
            layers (on a terminal); structural: a submodule (e.g. ``"encoder"``), the only part pruned and counted.

    Returns:
        The :class:`MaskSet` (True = kept), with the spec used and the dense copy. Structural patterns shrink the
        model instead: their MaskSet has no masks and carries the ``StructureReport`` in ``.structure``.

    Example:
        >>> import torch, regrow
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> masks = regrow.prune(net, 0.75)
        >>> float((net[0].weight == 0).float().mean())
        0.75
    """
    if isinstance(pattern, str) and pattern in STRUCTURAL:  # locals(): so far exactly the arguments
        options = {k: v for k, v in locals().items() if k not in ("model", "keep_dense", "max_sparsity", "progress")}
        cap = {} if max_sparsity is None else {"max_sparsity": max_sparsity}  # default: shrink's
        return structural_masks(model, dense=frozen_copy(model) if keep_dense else None, **options, **cap)
    request = (sparsity, threshold, pattern, criterion, scope, targets, ignore, allocation, max_sparsity, calibration)
    spec = _masked_spec(model, *request, macs, params, latency, within=within)
    if not get_pattern(spec.pattern).can_speed_up_dense:
        warnings.warn(speed_warning(spec.pattern), SpeedWarning, stacklevel=2)
    _warn_if_pruned_before(model, spec.targets)
    dense = frozen_copy(model) if keep_dense else None
    with _restored_on_error(model, spec.targets if is_calibrated(spec.criterion) else []):
        masks = MaskSet(compute_masks(model, spec, data, progress=progress), spec=spec, dense=dense)
    masks.apply(model)
    return masks


@contextlib.contextmanager
def _restored_on_error(model: nn.Module, targets: list[str]) -> Any:
    """Put ``targets`` back as they were if the block fails (a calibrated criterion prunes layer by layer)."""
    saved = {f: model.get_parameter(f).detach().clone() for f in targets}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for f, value in saved.items():
                model.get_parameter(f).copy_(value)
        raise


def _masked_spec(
    model: nn.Module,
    sparsity: float | None,
    threshold: float | None,
    pattern: str,
    criterion: str,
    scope: str,
    targets: str | Iterable[str] | None,
    ignore: str | Iterable[str] | None,
    allocation: dict[str, float] | None,
    max_sparsity: float | None,
    calibration: Calibration | dict[str, Any] | None,
    *budgets: float | None,
    within: str | None = None,
) -> PruneSpec:
    """The request of a masked pattern, checked against the model (``budgets``: macs, params, latency)."""
    if within is not None:
        raise RegrowError(
            f"within= scopes the budget of a structural pattern ('channel', 'head', 'channel+head'); pattern "
            f"{pattern!r} counts only its targets already: choose the part with targets= (e.g. '{within}.*')."
        )
    if any(b is not None for b in budgets):
        raise RegrowError(
            "macs=, params= and latency= budgets need a structural pattern ('channel', 'head' or 'channel+head'): "
            f"pattern {pattern!r} "
            "keeps every dense shape, so MACs and parameter storage do not change; give sparsity= instead."
        )
    spec = plan(
        model,
        sparsity,
        threshold=threshold,
        pattern=pattern,
        criterion=criterion,
        scope=scope,
        targets=targets,
        ignore=ignore,
        calibration=calibration,
    )
    if allocation is None:
        return spec if max_sparsity is None else dataclasses.replace(spec, cap=max_sparsity)
    unknown = sorted(set(allocation) - set(spec.targets))
    if unknown:
        raise RegrowError(f"allocation names parameters that are not targets: {unknown[:5]}.")
    if spec.threshold is not None:
        raise RegrowError(
            "an allocation plans per-target sparsities for a sparsity budget; give sparsity, not threshold."
        )
    return PruneSpec(
        spec.pattern,
        spec.criterion,
        spec.scope,
        spec.sparsity,
        None,
        spec.targets,
        allocation=dict(allocation),
        cap=max_sparsity,
        calibration=spec.calibration,
    )


def _warn_if_pruned_before(model: nn.Module, targets: list[str]) -> None:
    """Masks describe one call: weights zeroed by an earlier prune are not in them and may grow back."""
    with torch.no_grad():
        params = {f: model.get_parameter(f).detach() for f in targets}
        zeros = sum(count(params, f, lambda w: w == 0) for f in targets)  # chunk by chunk: no full-size temporaries
        total = sum(model.get_parameter(f).numel() for f in targets)
    if total and zeros > 0.01 * total:  # trained float weights are almost never exactly zero
        warnings.warn(
            f"the targets already hold {100 * zeros / total:.1f}% exact zeros (pruned before?). The masks returned "
            "describe this call only: weights zeroed earlier that these masks keep can grow back during recovery. "
            "Prune the dense model once at the final sparsity, or raise it step by step with regrow.GradualPruning.",
            stacklevel=3,
        )
