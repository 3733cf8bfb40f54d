"""The pruning request (:class:`PruneSpec`) and how an allocation's per-target shares meet its budget.

A data type shared by the layers that make masks (``regrow.prune``), hold them (``regrow.masks``) and plan
them (``regrow.allocation``), so it sits below all three and imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from regrow.errors import RegrowError

MASKED_CAP = 0.99  # by default no masked target loses more than this share of its weights
GLOBAL_FLOOR = 0.5  # by default a global ranking leaves every target this share of the overall density
# (benchmarks/results/global_floor.md: 0.5 was never worse than 0, 0.25 or no cap, and better where it bound)


@dataclass(frozen=True)
class PruneSpec:
    """A validated pruning request; ``targets`` are resolved fully-qualified names."""

    pattern: str
    criterion: str
    scope: str
    sparsity: float | None
    threshold: float | None
    targets: list[str] = field(default_factory=list)
    macs: float | None = None
    params: float | None = None
    allocation: dict[str, float] | None = None  # relative per-target sparsities; the budget scales them
    cap: float | None = None  # max_sparsity as given: no target sparser than this (default: see the methods)
    calibration: dict[str, Any] | None = None  # calibrated criteria: batches, dampening, block_size
    within: str | None = None  # structural: the submodule whose MACs / parameters the budget counts

    def allocation_cap(self) -> float:
        """The most an allocation removes from any target: ``cap``, by default ``MASKED_CAP`` (0.99)."""
        return MASKED_CAP if self.cap is None else self.cap

    def global_cap(self) -> float | None:
        """The most a global ranking of unstructured weights removes from any one target (None when nothing is
        ranked globally): ``cap`` when given; by default ``1 - GLOBAL_FLOOR * (1 - sparsity)``, at most
        ``MASKED_CAP`` (so every target keeps half the overall density and at least 1 %: 0.95 at sparsity
        0.9, 0.975 at 0.95, 0.99 from 0.98 on); never below the sparsity itself, which every target can take."""
        if self.pattern != "unstructured" or self.scope != "global" or self.sparsity is None or self.allocation:
            return None
        default = min(MASKED_CAP, 1.0 - GLOBAL_FLOOR * (1.0 - self.sparsity))
        return max(self.sparsity, default if self.cap is None else self.cap)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_sparsity(self, sparsity: float) -> PruneSpec:
        return PruneSpec(
            self.pattern,
            self.criterion,
            self.scope,
            sparsity,
            None,
            list(self.targets),
            allocation=self.allocation,
            cap=self.cap,
            calibration=self.calibration,
        )

    def per_target(self, model: nn.Module) -> dict[str, float] | None:
        """Each target's sparsity under the allocation, scaled so the overall sparsity is the budget's."""
        if self.allocation is None or self.sparsity is None:
            return None
        sizes = {f: model.get_parameter(f).numel() for f in self.targets}
        return scaled(
            {f: self.allocation.get(f, 0.0) for f in self.targets}, sizes, self.sparsity, self.allocation_cap()
        )


def check_shares(per_target: Any, where: str) -> dict[str, float]:
    """Per-target shares as ``{name: number in [0, 1]}``, or a RegrowError naming the entries that are not."""
    if not isinstance(per_target, dict):
        raise RegrowError(f"{where} must map target names to sparsities in [0, 1]; got {type(per_target).__name__}.")
    bad = [
        f"{k!r}: {v!r}"
        for k, v in per_target.items()
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0
    ]
    if bad:
        raise RegrowError(
            f"{where} must map target names to sparsities in [0, 1]; these are not: {', '.join(bad[:5])}."
        )
    return {str(k): float(v) for k, v in per_target.items()}


def scaled(per_target: dict[str, float], sizes: dict[str, int], sparsity: float, cap: float = 0.99) -> dict[str, float]:
    """Scale relative sparsities so that the size-weighted mean is ``sparsity`` (unstructured), no target
    above ``cap``; a RegrowError when the shares cannot reach it (too few targets carry any)."""
    per_target = check_shares(per_target, "an allocation")
    if sparsity <= 0:
        return {n: 0.0 for n in per_target}
    total = sum(sizes[n] for n in per_target)
    if total == 0:
        return {n: 0.0 for n in per_target}
    reachable = sum(cap * sizes[n] for n in per_target if per_target[n] > 0) / total
    if reachable < sparsity - 1e-9:
        carrying = [n for n in per_target if per_target[n] > 0]
        raise RegrowError(
            f"the allocation cannot reach sparsity {sparsity:g}: "
            + (
                f"only {', '.join(carrying[:5])} carry a share, and at most {cap:g} of each"
                if carrying
                else "every target's share is 0"
            )
            + f" removes {reachable:.3g} of the target weights. Give more targets a share, raise the cap "
            "(max_sparsity), or ask for less."
        )
    # The size-weighted mean of min(cap, m * share) rises piecewise linearly with m; walk its pieces, where
    # one target after another reaches the cap, to the one that holds the budget, and solve for m there.
    goal, capped, slope = sparsity * total, 0.0, sum(per_target[n] * sizes[n] for n in per_target)
    scale = math.inf
    for knee, n in sorted((cap / s, n) for n, s in per_target.items() if s > 0):
        if capped + knee * slope >= goal:
            scale = (goal - capped) / slope
            break
        capped += cap * sizes[n]
        slope -= per_target[n] * sizes[n]
    return {n: min(cap, scale * per_target[n]) if per_target[n] > 0 else 0.0 for n in per_target}
