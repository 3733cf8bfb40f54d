"""Choosing which units (channels or heads) go, so that a budget is met.

For a removal ratio ``r`` every group gives up its lowest-scored units: with ``scope="layer"`` a fraction
``r`` of each group, with ``scope="global"`` every unit whose score is below the ``r``-quantile of all
scores (scores are normalised per group, so groups of different scale compete fairly). Each group keeps at
least ``1 - max_sparsity`` of its units and one unit in any case, and so does each of its ``parts`` (the
units of a layer that holds only some of the group's channels, an input of a concatenation: were all of them
removed, that layer would be left with none). ``round_to`` rounds kept channel counts down to a
hardware-friendly multiple.

A budget on parameters or MACs is met by measuring candidates: each is applied to a copy of the model and
counted (``torch.utils.flop_counter``) until the achieved value is within ``tolerance`` (relative, default
2 %) of the target (see :func:`search`). When no selection gets that close, the closest one is used with a
warning if it is within 10 % of the target, and the request is refused with an error otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    allocation: float = 0.0  # scope "allocation": this group's share of the removal, relative to the others
    parts: tuple[tuple[int, ...], ...] = ()  # units of layers that hold only some of the group's channels


def _part_keep(part: tuple[int, ...], max_sparsity: float) -> int:
    """Units a part keeps at the least: as a group does, a share ``1 - max_sparsity`` and one in any case."""
    return max(1, math.ceil((1 - max_sparsity) * len(part) - 1e-9))


def _cap(group: Unitized, n_remove: int, max_sparsity: float) -> int:
    most = min(math.floor(max_sparsity * group.units + 1e-9), group.units - 1)
    if group.parts:  # exact for disjoint parts (a concatenation's inputs), on the safe side for overlapping ones
        most = min(most, group.units - sum(_part_keep(p, max_sparsity) for p in group.parts))
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


def _previous_count(group: Unitized, n: int, max_sparsity: float) -> int | None:
    """The largest valid removal count below ``n``."""
    for candidate in range(n - 1, -1, -1):
        if _cap(group, candidate, max_sparsity) == candidate:
            return candidate
    return None


def select(groups: list[Unitized], ratio: float, scope: str, max_sparsity: float) -> dict[str, list[int]]:
    """Units removed from each group for removal ratio ``ratio``; ties remove the lower index first."""
    removed: dict[str, list[int]] = {}
    if scope == "global" and groups:
        flat = torch.cat([g.scores for g in groups])
        k = min(len(flat), math.ceil(ratio * len(flat) - 1e-9))
        threshold = torch.sort(flat, stable=True).values[k - 1] if k > 0 else None
    top = max((g.allocation for g in groups), default=0.0) or 1.0
    for g in groups:
        if scope == "global":
            n = 0 if threshold is None else int((g.scores <= threshold).sum())
        elif scope == "allocation":  # the allocation's shape, scaled: the largest share reaches `ratio`
            n = math.ceil(ratio * g.allocation / top * g.units - 1e-9)
        else:
            n = math.ceil(ratio * g.units - 1e-9)
        n = _cap(g, n, max_sparsity)
        order = [int(i) for i in torch.sort(g.scores, stable=True).indices]
        removed[g.name] = sorted(take(g, order, n, max_sparsity))
    return removed


def take(group: Unitized, order: list[int], n: int, max_sparsity: float, have: list[int] | None = None) -> list[int]:
    """The first ``n`` units of ``order`` (not in ``have``, the units already removed) whose removal leaves every
    part of the group its least number of units; fewer when the parts allow no more."""
    taken: list[int] = []
    gone = set(have or [])
    if not group.parts:
        return [u for u in order if u not in gone][:n]
    room = [len(p) - _part_keep(p, max_sparsity) - len(gone.intersection(p)) for p in group.parts]
    where = [[i for i, p in enumerate(group.parts) if u in p] for u in range(group.units)]
    for u in order:
        if len(taken) >= n:
            break
        if u in gone or any(room[i] <= 0 for i in where[u]):
            continue
        for i in where[u]:
            room[i] -= 1
        taken.append(u)
    return taken


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
    """Find a selection whose measured value is within ``tolerance`` (relative) of ``target``.

    1. Bisection on the removal ratio (``select`` with the requested scope).
    2. When one step of the ratio moves the value by more than the tolerance (a few wide units), go on unit
       by unit from the last selection short of the target: add the next lowest-scored unit when it does
       not overshoot, skip it when it does.
    3. Likewise backwards from the first selection past the target, putting back the highest-scored
       removed units.
    4. As a last resort, bisection with ``scope="layer"`` (every group gives up the same share).

    ``decreasing``: the measured value falls as more is removed (kept MACs, kept parameters); otherwise it
    rises (fraction of units removed). The closest selection seen is returned if none is within tolerance.
    """
    return _Search(groups, target, measure, scope, max_sparsity, tolerance, decreasing, iterations, fill_steps).run()


class _Search:
    """One run of :func:`search`: its settings, every selection measured so far (each is measured once), and
    the closest one seen."""

    def __init__(
        self,
        groups: list[Unitized],
        target: float,
        measure: Callable[[dict[str, list[int]]], float],
        scope: str,
        max_sparsity: float,
        tolerance: float,
        decreasing: bool,
        iterations: int,
        fill_steps: int,
    ) -> None:
        self.groups, self.target, self.measure, self.scope = groups, target, measure, scope
        self.max_sparsity, self.tolerance, self.decreasing = max_sparsity, tolerance, decreasing
        self.iterations, self.fill_steps = iterations, fill_steps
        self.evaluations = 0
        self.cache: dict[tuple[tuple[str, tuple[int, ...]], ...], float] = {}
        self.best: list[Any] = [float("inf"), None, float("nan")]  # error, removed, value
        self.by_name = {g.name: g for g in groups}
        self.order = {g.name: [int(i) for i in torch.sort(g.scores, stable=True).indices] for g in groups}

    def run(self) -> SearchResult:
        """Steps 1-4 of :func:`search`, each only while no selection is within tolerance yet."""
        short_side, over_side = self.bisect(self.scope)
        if self.done() is None:
            self.fill_forward(short_side)
        if self.done() is None and over_side is not None:
            self.fill_backward(over_side)
        if self.done() is None and self.scope == "global":
            short_side, over_side = self.bisect("layer")
            if self.done() is None:
                self.fill_forward(short_side)
        result = self.done()
        if result is not None:
            return result
        return SearchResult(float("nan"), self.best[1], self.best[2], self.evaluations, False)

    def value_of(self, removed: dict[str, list[int]]) -> float:
        """The measured value of a selection (measured on first sight), keeping track of the closest one."""
        key = tuple(sorted((k, tuple(v)) for k, v in removed.items()))
        if key not in self.cache:
            self.cache[key] = self.measure(removed)
            self.evaluations += 1
            err = abs(self.cache[key] - self.target) / max(abs(self.target), 1e-12)
            if err < self.best[0]:
                self.best[:] = [err, {k: list(v) for k, v in removed.items()}, self.cache[key]]
        return self.cache[key]

    def done(self) -> SearchResult | None:
        """The closest selection when it is within tolerance, else None."""
        if self.best[0] <= self.tolerance:
            return SearchResult(float("nan"), self.best[1], self.best[2], self.evaluations, True)
        return None

    def short(self, value: float) -> bool:
        """Not enough removed yet."""
        return value > self.target if self.decreasing else value < self.target

    def bisect(self, sc: str) -> tuple[dict[str, list[int]], dict[str, list[int]] | None]:
        """Bisect the removal ratio with scope ``sc``: the last selection short of the target and the last
        one past it (None if none was)."""
        lo, hi = 0.0, 1.0
        short_side, over_side = select(self.groups, 0.0, sc, self.max_sparsity), None
        for _ in range(self.iterations):
            mid = (lo + hi) / 2
            removed = select(self.groups, mid, sc, self.max_sparsity)
            value = self.value_of(removed)
            if self.best[0] <= self.tolerance:
                break
            if self.short(value):
                lo, short_side = mid, removed
            else:
                hi, over_side = mid, removed
        return short_side, over_side

    def fill_order(self, removed: dict[str, list[int]], reverse: bool) -> list[tuple[float, str, int]]:
        """Units in the order the walk should take (or, reversed, put back) them.

        Global and layer scopes follow the scores; an allocation fills every group in proportion to its
        share (the k-th unit of a group comes at k / (units * share)), so the walk keeps the planned shape.
        """
        if self.scope != "allocation":
            if reverse:
                return sorted(
                    ((float(self.by_name[n].scores[i]), n, i) for n, us in removed.items() for i in us), reverse=True
                )
            return sorted(
                (float(g.scores[i]), g.name, i)
                for g in self.groups
                for i in range(g.units)
                if i not in removed.get(g.name, [])
            )
        keyed = []
        for g in self.groups:
            if g.allocation <= 0:
                continue
            for rank, unit in enumerate(self.order[g.name]):
                key = (rank + 1) / (g.units * g.allocation)
                if (unit in removed.get(g.name, [])) == reverse:
                    keyed.append((key, g.name, unit))
        return sorted(keyed, reverse=reverse)

    def fill_forward(self, start: dict[str, list[int]]) -> None:
        """Step 2: from ``start`` (short of the target), remove unit by unit while that does not overshoot."""
        removed = {k: list(v) for k, v in start.items()}
        queue = self.fill_order(removed, reverse=False)
        for steps, (_, name, unit) in enumerate(queue):
            if steps >= self.fill_steps or self.best[0] <= self.tolerance:
                return
            have = removed.get(name, [])
            if unit in have:
                continue  # taken along with an earlier unit to keep a round_to step
            count = _next_count(self.by_name[name], len(have), self.max_sparsity)
            if count is None:
                continue  # the group is at its cap
            trial = dict(removed)
            group = self.by_name[name]
            trial[name] = sorted(have + take(group, self.order[name], count - len(have), self.max_sparsity, have))
            if self.short(self.value_of(trial)):
                removed = trial

    def fill_backward(self, start: dict[str, list[int]]) -> None:
        """Step 3: from ``start`` (past the target), put units back one by one while it stays past it."""
        removed = {k: list(v) for k, v in start.items()}
        queue = self.fill_order(removed, reverse=True)
        for steps, (_, name, unit) in enumerate(queue):
            if steps >= self.fill_steps or self.best[0] <= self.tolerance:
                return
            have = removed.get(name, [])
            if unit not in have:
                continue
            count = _previous_count(self.by_name[name], len(have), self.max_sparsity)
            if count is None:
                continue
            keep_removed = [u for u in self.order[name] if u in have][:count]  # put back the highest scores first
            trial = dict(removed)
            trial[name] = sorted(keep_removed)
            if not self.short(self.value_of(trial)):
                removed = trial


def check_reachable(
    result: SearchResult, target: float, what: str, max_sparsity: float, tolerance: float = TOLERANCE
) -> str | None:
    """None when the budget was met; a warning when it was missed by a little; an error when by a lot."""
    if result.within_tolerance:
        return None
    miss = abs(result.achieved - target) / max(abs(target), 1e-12)
    text = (
        f"the {what} budget {target:g} cannot be met within {100 * tolerance:g}%: the closest selection gives "
        f"{result.achieved:.4g}. Units are coarse (few or wide channels, round_to), each group keeps at least "
        f"{1 - max_sparsity:.0%} of its units (max_sparsity), as does each layer that holds part of a group, and "
        "excluded groups cannot help"
    )
    if miss > 5 * TOLERANCE:
        raise RegrowError(text + "; raise max_sparsity, lower round_to, or ask for a reachable budget.")
    return text + "; going on with the closest selection."
