"""Patterns: turn importance scores and a budget into keep-masks.

A pattern only sees scores, so every criterion works with every pattern. Ties are broken the same way
everywhere: among equal scores, the element that comes first in row-major order is pruned first. A
sparsity removes the fewest weights that reach it (never fewer: 0.9 of 70,288 weights removes 63,260).

* ``unstructured`` — any weight may go. ``scope="layer"`` prunes the same fraction of every target;
  ``scope="row"`` the same fraction of every output row (dim 0) of every target (Wanda's comparison group);
  ``scope="global"`` ranks all targets together. With ``threshold``, every weight whose score is below
  the threshold goes.
* ``n:m`` (e.g. ``2:4``) — in each group of ``m`` consecutive weights along the input dimension, keep the
  ``n`` highest scores (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). For a Conv weight
  the groups run across input channels at each kernel position. Sparsity is fixed at ``1 - n/m``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from regrow.criteria.base import score_like
from regrow.errors import RegrowError
from regrow.ranking import count, lowest_masks
from regrow.registry import Registry

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def pruned_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` elements a sparsity removes: the fewest that reach at least ``sparsity``.

    Rounding up means the achieved sparsity is never below the one asked for (0.9 of 70,288 weights
    removes 63,260, not 63,259); the tolerance keeps float noise such as 0.3 * 10 = 3.0000000000000004
    from removing one more. A sparsity below 1 always keeps at least one element: 0.99 of a 12-weight layer
    removes 11, not the whole layer.
    """
    most = numel if sparsity >= 1 else max(numel - 1, 0)
    return min(most, math.ceil(sparsity * numel - 1e-9))


def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask that drops the ``k`` lowest entries of a flat tensor; ties drop the earlier entry."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.reshape(-1), stable=True).indices
        keep[order[:k]] = False
    return keep


def _row_lowest(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask that prunes the same count, ``pruned_count`` of a row, from every output row (dim 0)."""
    rows = scores.reshape(scores.shape[0], -1)
    k = pruned_count(sparsity, rows.shape[1])
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.sort(rows, dim=1, stable=True).indices[:, :k], False)
    return keep.reshape(scores.shape)


class Pattern(Protocol):
    name: str
    can_speed_up_dense: bool
    structural: bool
    speed_note: str

    def check(self, shapes: dict[str, torch.Size], *, sparsity: float | None, threshold: float | None) -> None:
        """Raise RegrowError when the budget or a target's shape does not suit the pattern."""

    def make_masks(
        self,
        scores: Mapping[str, Tensor],
        *,
        sparsity: float | None,
        threshold: float | None,
        scope: str,
        cap: float | None = None,
    ) -> dict[str, Tensor]: ...


PATTERNS: Registry[type] = Registry("pattern")


@PATTERNS.register("unstructured")
@dataclass(frozen=True)
class Unstructured:
    """Any individual weight may be zeroed (highest compression, no dense-kernel speed-up)."""

    name: str = "unstructured"
    can_speed_up_dense: bool = False
    structural: bool = False
    speed_note: str = (
        "Unstructured zeros do not make dense kernels faster: the model has the same shapes and the same "
        "dense MACs; the gain is in compressed size, or in speed only with a sparse runtime."
    )

    def check(self, shapes: dict[str, torch.Size], *, sparsity: float | None, threshold: float | None) -> None:
        check_budget(sparsity, threshold)

    def make_masks(
        self,
        scores: Mapping[str, Tensor],
        *,
        sparsity: float | None,
        threshold: float | None,
        scope: str,
        cap: float | None = None,
    ) -> dict[str, Tensor]:
        if threshold is not None:
            masks = {f: s >= threshold for f, s in scores.items()}
            if masks and not any(bool(m.any()) for m in masks.values()):
                warnings.warn(
                    f"threshold {threshold:g} is above every target weight's score: every target is now all zeros.",
                    stacklevel=4,
                )
            return masks
        assert sparsity is not None
        if scope == "layer":
            return {f: _prune_lowest(s, pruned_count(sparsity, s.numel())).reshape(s.shape) for f, s in scores.items()}
        if scope == "row":
            return {f: _row_lowest(s, sparsity) for f, s in scores.items()}
        return _global(scores, sparsity, 1.0 if cap is None else cap)


def _global(scores: Mapping[str, Tensor], sparsity: float, cap: float) -> dict[str, Tensor]:
    """One ranking over every target, no target losing more than ``cap`` of its weights.

    The lowest-scored weights of all targets go first; a target that would lose more than ``cap`` loses exactly
    that share (its lowest), and the rest of the budget is ranked again over the other targets, until none is
    over its cap (at most one round per target). With ``cap`` >= ``sparsity`` the limits add up to the budget
    at least (both round the same way), so it is met exactly; except that a cap below 1 always leaves every
    target one weight, which at extreme sparsities over small targets leaves the budget short by those weights.
    The ranking reads one target's scores at a time and never sorts them all (``regrow.ranking``).
    """
    sizes = {f: score_like(scores, f).numel() for f in scores}
    lost_before = {f: count(scores, f, torch.isneginf) for f in scores}
    budget = pruned_count(sparsity, sum(sizes.values()))
    # the most each target may lose, rounded as the budget is (so that cap = sparsity fits exactly), and never
    # less than what it lost before (a gradual schedule's earlier masks: their weights score -inf)
    limit = {f: max(pruned_count(cap, n) if cap < 1 else n, lost_before[f]) for f, n in sizes.items()}
    pinned: set[str] = set()
    while True:
        free = [f for f in scores if f not in pinned]
        out: dict[str, Tensor] = {}  # the last round's masks are freed before this round's are made
        out = lowest_masks(scores, free, max(0, budget - sum(limit[f] for f in pinned)))
        over = {f for f in free if sizes[f] - int(torch.count_nonzero(out[f])) > limit[f]}
        if not over:
            break
        pinned |= over
    for f in pinned:
        out[f] = lowest_masks(scores, [f], limit[f])[f]
    emptied = [f for f in scores if not bool(out[f].any())]
    if emptied and sparsity < 1.0 and len(emptied) < len(out):  # only without a cap below 1
        warnings.warn(
            f"the global ranking removed every weight of {', '.join(repr(f) for f in emptied[:5])}: its scores are "
            "below the other targets', so nothing flows through it any more. Leave max_sparsity at its default "
            "(prune.max_sparsity in a recipe), use scope 'layer', or leave the target out with ignore.",
            stacklevel=5,
        )
    return {f: out[f] for f in scores}


@PATTERNS.register("n:m", doc="Keep n of every m consecutive input weights, e.g. '2:4' (sparse tensor cores).")
@dataclass(frozen=True)
class NM:
    n: int = 2
    m: int = 4
    can_speed_up_dense: bool = False
    structural: bool = False
    speed_note: str = (
        "N:M zeros keep dense shapes: dense kernels run no faster. Only hardware and kernels with "
        "semi-structured sparsity support (e.g. 2:4 on NVIDIA Ampere or newer) can turn them into speed."
    )

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    def check(self, shapes: dict[str, torch.Size], *, sparsity: float | None, threshold: float | None) -> None:
        if threshold is not None:
            raise RegrowError(
                f"pattern '{self.name}' fixes the sparsity at {1 - self.n / self.m:g}; do not give a threshold."
            )
        if sparsity is not None and not math.isclose(sparsity, 1 - self.n / self.m, abs_tol=1e-9):
            raise RegrowError(
                f"pattern '{self.name}' fixes the sparsity at {1 - self.n / self.m:g}, but sparsity "
                f"{sparsity:g} was asked for; leave sparsity unset or set it to {1 - self.n / self.m:g}."
            )
        for fqn, shape in shapes.items():
            if len(shape) < 2:
                raise RegrowError(
                    f"pattern '{self.name}' needs weights with an input dimension; target {fqn!r} has shape "
                    f"{tuple(shape)}."
                )
            if shape[1] % self.m:
                raise RegrowError(
                    f"pattern '{self.name}' groups {self.m} consecutive input weights, but target {fqn!r} "
                    f"has {shape[1]} inputs, which is not divisible by {self.m}; leave it out with 'ignore'."
                )

    def make_masks(
        self,
        scores: Mapping[str, Tensor],
        *,
        sparsity: float | None,
        threshold: float | None,
        scope: str,
        cap: float | None = None,
    ) -> dict[str, Tensor]:
        out = {}
        for f, s in scores.items():
            # Move the input dimension last, then view it as groups of m.
            moved = s.movedim(1, -1)
            groups = moved.reshape(-1, self.m)
            order = torch.sort(groups, dim=1, stable=True).indices
            keep = torch.ones_like(groups, dtype=torch.bool)
            keep.scatter_(1, order[:, : self.m - self.n], False)
            out[f] = keep.reshape(moved.shape).movedim(-1, 1).contiguous()
        return out


@dataclass(frozen=True)
class _Structural:
    """Shared by the patterns that shrink the model instead of masking it (see regrow.structural)."""

    name: str = ""
    can_speed_up_dense: bool = True
    structural: bool = True
    speed_note: str = ""

    def check(self, shapes: dict[str, torch.Size], *, sparsity: float | None, threshold: float | None) -> None:
        pass  # budgets are checked by regrow.structural.check_structural_budget

    def make_masks(
        self,
        scores: Mapping[str, Tensor],
        *,
        sparsity: float | None,
        threshold: float | None,
        scope: str,
        cap: float | None = None,
    ) -> dict[str, Tensor]:
        raise RegrowError(f"pattern '{self.name}' shrinks the model; it makes no masks.")


@PATTERNS.register("channel")
@dataclass(frozen=True)
class Channel(_Structural):
    """Remove whole Conv filters / Linear neurons with everything coupled to them (real speed-up)."""

    name: str = "channel"
    speed_note: str = (
        "Removed channels make the dense layers themselves smaller: MACs, parameters and measured latency "
        "fall together."
    )


@PATTERNS.register("head")
@dataclass(frozen=True)
class Head(_Structural):
    """Remove whole attention heads (nn.MultiheadAttention and modules declaring num_heads)."""

    name: str = "head"
    speed_note: str = (
        "Removed heads make the attention projections smaller: MACs, parameters and measured latency fall together."
    )


@PATTERNS.register("channel+head")
@dataclass(frozen=True)
class ChannelHead(_Structural):
    """Remove channels and attention heads together, against one budget."""

    name: str = "channel+head"
    speed_note: str = (
        "Removed channels and heads make the dense layers and attention projections smaller: MACs, parameters and "
        "measured latency fall together."
    )


def check_budget(sparsity: float | None, threshold: float | None) -> None:
    """Exactly one of sparsity / threshold, and sparsity in [0, 1)."""
    if (sparsity is None) == (threshold is None):
        which = "both" if sparsity is not None else "neither"
        raise RegrowError(
            f"give exactly one of sparsity (fraction of target weights to zero, in [0, 1)) or threshold "
            f"(zero every weight whose score is below it); {which} was given."
        )
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise RegrowError(
                f"sparsity must be a number in [0, 1) (the fraction of target weights set to zero); got {sparsity!r}."
            )
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold)
    ):
        raise RegrowError(f"threshold must be a number; got {threshold!r}.")


def get_pattern(name: str) -> Pattern:
    """Parse a pattern name: ``"unstructured"`` or ``"n:m"`` such as ``"2:4"``."""
    if not isinstance(name, str):
        raise RegrowError(f"pattern must be a string such as 'unstructured' or '2:4'; got {name!r}.")
    match = _NM.match(name)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise RegrowError(f"pattern '{name}' is not a valid n:m pattern: it needs 0 < n < m, e.g. '2:4' or '1:4'.")
        return NM(n=n, m=m)
    if name == "n:m":
        raise RegrowError("pattern 'n:m' needs numbers, e.g. '2:4' (keep 2 of every 4).")
    if name not in PATTERNS:
        allowed = [p if p != "n:m" else "n:m (e.g. '2:4')" for p in PATTERNS.names()]
        raise RegrowError(f"unknown pattern {name!r}; allowed values: {', '.join(allowed)}.")
    return PATTERNS.get(name)()
