"""``regrow.prune``: score the targets, turn scores into masks, zero the pruned weights."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from regrow.criteria import CRITERIA
from regrow.errors import one_of
from regrow.masks import MaskSet
from regrow.patterns import get_pattern
from regrow.select import resolve_targets

SCOPES = ("global", "layer")


@dataclass(frozen=True)
class PruneSpec:
    """A validated pruning request; ``targets`` are resolved fully-qualified names."""

    pattern: str
    criterion: str
    scope: str
    sparsity: float | None
    threshold: float | None
    targets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_sparsity(self, sparsity: float) -> PruneSpec:
        return PruneSpec(self.pattern, self.criterion, self.scope, sparsity, None, list(self.targets))


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
) -> PruneSpec:
    """Validate a pruning request against a model without changing it.

    Raises:
        RegrowError: with one paragraph naming the bad argument and the allowed values.
    """
    pat = get_pattern(pattern)
    if criterion not in CRITERIA:
        raise one_of("criterion", criterion, CRITERIA.names())
    if scope not in SCOPES:
        raise one_of("scope", scope, SCOPES)
    fqns = resolve_targets(model, targets, ignore)
    pat.check({f: model.get_parameter(f).shape for f in fqns}, sparsity=sparsity, threshold=threshold)
    if sparsity is None and threshold is None:  # n:m: the pattern fixes the sparsity
        sparsity = 1 - pat.n / pat.m  # type: ignore[attr-defined]
    return PruneSpec(pat.name, criterion, scope, sparsity, threshold, fqns)


def compute_masks(
    model: nn.Module,
    spec: PruneSpec,
    data: Iterable[Any] | None = None,
    previous: MaskSet | None = None,
) -> dict[str, Tensor]:
    """Masks for ``spec`` on the model's current weights.

    With ``previous``, weights pruned before stay pruned (their score is set to -inf), so a schedule that
    raises the sparsity step by step only ever removes more.
    """
    scores = CRITERIA.get(spec.criterion)(model, spec.targets, data)
    if previous is not None:
        scores = {f: s.masked_fill(~previous[f].to(s.device), float("-inf")) for f, s in scores.items()}
    masks = get_pattern(spec.pattern).make_masks(
        scores, sparsity=spec.sparsity, threshold=spec.threshold, scope=spec.scope
    )
    if previous is not None:
        masks = {f: m & previous[f].to(m.device) for f, m in masks.items()}
    return masks


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
) -> MaskSet:
    """Prune ``model`` in place and return the keep-masks.

    Args:
        model: a trained model; its pruned weights become exactly zero.
        sparsity: fraction of target weights to zero, in [0, 1). Give this or ``threshold``.
        threshold: zero every target weight whose score is below this value.
        pattern: ``"unstructured"`` or an n:m pattern such as ``"2:4"``.
        criterion: ``"magnitude"``, ``"random"`` or ``"taylor"`` (needs ``data``); see ``regrow list``.
        scope: ``"global"`` (one ranking over all targets) or ``"layer"`` (same sparsity per target).
        targets: fqns or globs of parameters to prune. Default: weights of all Linear/Conv layers except
            the final classifier (the last one registered).
        ignore: fqns or globs removed from the targets.
        data: an iterable of ``(inputs, targets)`` batches, for data-driven criteria.
        keep_dense: keep a frozen copy of the model from before pruning in ``MaskSet.dense`` (the
            default teacher for distillation).

    Returns:
        The :class:`MaskSet` (True = kept), with the spec used and the dense copy.

    Example:
        >>> import torch, regrow
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> masks = regrow.prune(net, 0.75)
        >>> float((net[0].weight == 0).float().mean())
        0.75
    """
    spec = plan(
        model,
        sparsity,
        threshold=threshold,
        pattern=pattern,
        criterion=criterion,
        scope=scope,
        targets=targets,
        ignore=ignore,
    )
    dense = frozen_copy(model) if keep_dense else None
    masks = MaskSet(compute_masks(model, spec, data), spec=spec, dense=dense)
    masks.apply(model)
    return masks
