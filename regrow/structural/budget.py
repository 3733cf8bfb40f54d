"""Choosing which units (channels or heads) go, so that a budget is met.

For a removal ratio ``r`` every group gives up its lowest-scored units: with ``scope="layer"`` a fraction
``r`` of each group, with ``scope="global"`` every unit whose score is below the ``r``-quantile of all
scores (scores are normalised per group, so groups of different scale compete fairly). Each group keeps at
least ``1 - max_sparsity`` of its units and one unit in any case, and ``round_to`` rounds kept channel
counts down to a hardware-friendly multiple.

A budget on parameters or MACs is met by bisection on ``r``: each candidate is applied to a copy of the
model and measured (``torch.utils.flop_counter``), until the achieved value is within ``tolerance``
(relative, default 2 %) of the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from regrow.errors import RegrowError

TOLERANCE = 0.02


@dataclass
class Unitized:
    """One prunable group as the selection sees it."""

    name: str
    units: int
    scores: Tensor  # (units,), higher = more important
    step: int = 1  # kept units must be a multiple of this (from round_to); 1 = any count


def _cap(group: Unitized, n_remove: int, max_sparsity: float) -> int:
    most = min(math.floor(max_sparsity * group.units + 1e-9), group.units - 1)
    n = max(0, min(n_remove, most))
    if group.step > 1 and group.units >= group.step:
        keep = group.units - n
        keep = max(group.step, (keep // group.step) * group.step)
        n = group.units - keep
        if n > most:  # rounding down went past the cap: round up instead
            n = max(0, group.units - ((group.units - most + group.step - 1) // group.step) * group.step)
    return n


def _next_count(group: Unitized, n: int, max_sparsity: float) -> int | None:
    """The smallest valid removal count above ``n`` (respecting the cap and the round_to step)."""
    for candidate in range(n + 1, group.units):
        if _cap(group, candidate, max_sparsity) == candidate:
            return candidate
        if _cap(group, candidate, max_sparsity) < n + 1 and candidate > n + group.step:
            return None
    return None


def select(groups: list[Unitized], ratio: float, scope: str, max_sparsity: float) -> dict[str, list[int]]:
    """Units removed from each group for removal ratio ``ratio``; ties remove the lower index first."""
    removed: dict[str, list[int]] = {}
    if scope == "global" and groups:
        flat = torch.cat([g.scores for g in groups])
        k = min(len(flat), math.ceil(ratio * len(flat) - 1e-9))
        threshold = torch.sort(flat, stable=True).values[k - 1] if k > 0 else None
    for g in groups:
        if scope == "global":
            n = 0 if threshold is None else int((g.scores <= threshold).sum())
        else:
            n = math.ceil(ratio * g.units - 1e-9)
        n = _cap(g, n, max_sparsity)
        order = torch.sort(g.scores, stable=True).indices
        removed[g.name] = sorted(int(i) for i in order[:n])
    return removed


@dataclass
class SearchResult:
    ratio: float
    removed: dict[str, list[int]]
    achieved: float
    evaluations: int
    within_tolerance: bool


def search(
    groups: list[Unitized],
    target: float,
    measure: Callable[[dict[str, list[int]]], float],
    scope: str,
    max_sparsity: float,
    tolerance: float = TOLERANCE,
    decreasing: bool = True,
    iterations: int = 24,
    fill_steps: int = 64,
) -> SearchResult:
    """Bisection on the removal ratio until ``measure(selection)`` is within ``tolerance`` of ``target``.

    ``decreasing``: the measured value falls as more is removed (kept MACs, kept parameters); otherwise
    it rises (fraction of channels removed). When one step of the ratio moves the value by more than the
    tolerance (a few wide units), the search goes on unit by unit from the last selection short of the
    target: the next lowest-scored unit is added when it does not overshoot, skipped when it does.
    """
    evaluations = 0
    cache: dict[tuple[tuple[str, tuple[int, ...]], ...], float] = {}

    def value_of(removed: dict[str, list[int]]) -> float:
        nonlocal evaluations
        key = tuple(sorted((k, tuple(v)) for k, v in removed.items()))
        if key not in cache:
            cache[key] = measure(removed)
            evaluations += 1
        return cache[key]

    def error(value: float) -> float:
        return abs(value - target) / max(abs(target), 1e-12)

    def short(value: float) -> bool:  # not enough removed yet
        return value > target if decreasing else value < target

    lo, hi = 0.0, 1.0
    best: tuple[float, dict[str, list[int]], float] | None = None  # (error, removed, value)
    short_side: tuple[dict[str, list[int]], float] = (select(groups, 0.0, scope, max_sparsity), float("nan"))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        removed = select(groups, mid, scope, max_sparsity)
        value = value_of(removed)
        if best is None or error(value) < best[0]:
            best = (error(value), removed, value)
        if error(value) <= tolerance:
            return SearchResult(mid, removed, value, evaluations, True)
        if short(value):
            lo, short_side = mid, (removed, value)
        else:
            hi = mid
    # Unit by unit from the short side, lowest scores first.
    removed = {k: list(v) for k, v in short_side[0].items()}
    by_name = {g.name: g for g in groups}
    queue = sorted(
        (
            (float(g.scores[i]), g.name, int(i))
            for g in groups
            for i in range(g.units)
            if int(i) not in removed.get(g.name, [])
        ),
    )
    steps = 0
    for _, name, unit in queue:
        if steps >= fill_steps:
            break
        g = by_name[name]
        have = removed.get(name, [])
        if unit in have:
            continue  # taken along with an earlier unit to keep a round_to step
        count = _next_count(g, len(have), max_sparsity)
        if count is None:
            continue  # the group is at its cap
        order = [int(i) for i in torch.sort(g.scores, stable=True).indices if int(i) not in have]
        trial = {k: list(v) for k, v in removed.items()}
        trial[name] = sorted(have + order[: count - len(have)])
        value = value_of(trial)
        steps += 1
        if best is None or error(value) < best[0]:
            best = (error(value), trial, value)
        if error(value) <= tolerance:
            return SearchResult(float("nan"), trial, value, evaluations, True)
        if short(value):
            removed = trial
    assert best is not None
    return SearchResult(float("nan"), best[1], best[2], evaluations, best[0] <= tolerance)


def check_reachable(result: SearchResult, target: float, what: str, max_sparsity: float) -> str | None:
    """None when the budget was met; a warning when it was missed by a little; an error when by a lot."""
    if result.within_tolerance:
        return None
    miss = abs(result.achieved - target) / max(abs(target), 1e-12)
    text = (
        f"the {what} budget {target:g} cannot be met within {100 * TOLERANCE:g}%: the closest selection gives "
        f"{result.achieved:.4g}. Units are coarse (few or wide channels, round_to), each group keeps at least "
        f"{1 - max_sparsity:.0%} of its units (max_sparsity), and excluded groups cannot help"
    )
    if miss > 5 * TOLERANCE:
        raise RegrowError(text + "; raise max_sparsity, lower round_to, or ask for a reachable budget.")
    return text + "; going on with the closest selection."
