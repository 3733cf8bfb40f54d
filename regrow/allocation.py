"""Allocation: per-target (or per-group) sparsities chosen to meet one global budget.

* ``uniform`` — every target or group gets the same sparsity (``scope="layer"``).
* ``global`` — one ranking of scores over all targets (``scope="global"``); the sparsities follow.
* ``sensitivity`` — from the sensitivity curves: sparsity is added where it costs least, step by step,
  always to the target whose next step raises the calibration loss least per unit of cost removed
  (parameters, or MACs for structural budgets), until the budget is met: the marginal loss per unit of
  cost is equalised across targets (the idea behind layer-wise allocations such as Lee et al. 2021, LAMP,
  and sensitivity pruning since Han et al. 2015).
* ``search`` — a small evolutionary search around the sensitivity allocation (and the uniform one):
  candidates are perturbed per target, rescaled to the budget, applied jointly to a copy of the model
  and scored by their real calibration loss; the best is kept. The structure search in its simplest
  useful form.

Every allocation respects per-target clamps (``min_sparsity``, ``max_sparsity``) and is saved as
``allocation.json``, which a later recipe can load with ``prune.allocation_file``.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from regrow.errors import RegrowError, one_of
from regrow.io import atomic_write_text
from regrow.measure.sensitivity import SensitivityResult
from regrow.spec import check_shares
from regrow.spec import scaled as scaled  # defined here before; importable from here still

ALLOCATIONS = ("uniform", "global", "sensitivity", "search")
GRID_STEP = 0.01


@dataclass
class Allocation:
    """Relative per-target sparsities (the budget scales them exactly when pruning)."""

    method: str
    pattern: str
    budget: dict[str, float]
    per_target: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "regrow.allocation", **asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Allocation:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegrowError(f"allocation file {os.fspath(path)!r} is not readable JSON ({exc}).") from None
        if data.pop("format", None) != "regrow.allocation":
            raise RegrowError(
                f"{os.fspath(path)!r} is not a regrow allocation file (written as allocation.json by a run)."
            )
        try:
            allocation = cls(**data)
        except TypeError as exc:
            raise RegrowError(f"allocation file {os.fspath(path)!r} has unexpected content ({exc}).") from None
        allocation.per_target = check_shares(allocation.per_target, f"allocation file {os.fspath(path)!r}")
        return allocation

    def markdown(self) -> str:
        lines = ["| target / group | sparsity |", "|---|---|"]
        lines += [f"| `{k}` | {100 * v:.1f}% |" for k, v in self.per_target.items()]
        return "\n".join(lines)


def _cost_curves(result: SensitivityResult, cost: str) -> dict[str, list[float]]:
    key = "macs_removed" if cost == "macs" else "params_removed"
    return {c.name: [0.0, *map(float, getattr(c, key))] for c in result.curves}


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    from regrow.measure.sensitivity import _interp as interp

    return interp(x, xs, ys)


def needed_cost(result: SensitivityResult, kind: str, value: float) -> tuple[str, float]:
    """Which cost the budget is about, and how much of it must be removed."""
    if kind == "macs":
        return "macs", (1.0 - value) * result.total_macs
    if kind == "params":
        return "params", (1.0 - value) * result.total_params
    if kind == "sparsity" and result.pattern in ("channel", "head", "channel+head"):
        return "units", value * sum(c.size for c in result.curves)
    if kind == "sparsity":
        return "params", value * sum(c.size for c in result.curves)
    raise RegrowError(f"allocation cannot plan for a {kind!r} budget; use sparsity, macs or params.")


def sensitivity_allocation(
    result: SensitivityResult,
    kind: str,
    value: float,
    *,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.9,
    clamps: dict[str, tuple[float, float]] | None = None,
) -> dict[str, float]:
    """Greedy equal-marginal allocation on the sensitivity curves (see the module doc)."""
    cost_kind, needed = needed_cost(result, kind, value)
    xs = [0.0, *result.levels]
    losses = {c.name: [result.baseline_loss, *c.loss] for c in result.curves}
    if cost_kind == "units":
        costs = {c.name: [lv * c.size for lv in xs] for c in result.curves}
    else:
        costs = _cost_curves(result, cost_kind)
    bounds = {c.name: (clamps or {}).get(c.name, (min_sparsity, max_sparsity)) for c in result.curves}
    level = {name: lo for name, (lo, _) in bounds.items()}

    def removed() -> float:
        return sum(_interp(level[n], xs, costs[n]) for n in level)

    guard = 0
    while removed() < needed and guard < 100000:
        guard += 1
        best, best_ratio = None, math.inf
        for name, current in level.items():
            nxt = min(bounds[name][1], current + GRID_STEP)
            if nxt <= current + 1e-12:
                continue
            d_cost = _interp(nxt, xs, costs[name]) - _interp(current, xs, costs[name])
            if d_cost <= 0:
                continue
            d_loss = max(0.0, _interp(nxt, xs, losses[name]) - _interp(current, xs, losses[name]))
            ratio = (d_loss + 1e-9) / d_cost
            if ratio < best_ratio:
                best, best_ratio = name, ratio
        if best is None:
            raise RegrowError(
                f"the {kind} budget {value:g} cannot be met with every target at most {max_sparsity:.0%} sparse; "
                "raise max_sparsity or ask for less."
            )
        level[best] = min(bounds[best][1], level[best] + GRID_STEP)
    return {n: round(v, 4) for n, v in level.items()}


def fit_to_budget(
    candidate: dict[str, float],
    result: SensitivityResult,
    kind: str,
    value: float,
    bounds: dict[str, tuple[float, float]],
) -> dict[str, float]:
    """``candidate`` scaled by one factor, each entry kept within its bounds, so that its estimated removal
    (from the sensitivity cost curves) meets the budget; the shape is kept where the bounds allow."""
    cost_kind, needed = needed_cost(result, kind, value)
    xs = [0.0, *result.levels]
    sizes = {c.name: c.size for c in result.curves}
    costs = (
        {n: [lv * sizes[n] for lv in xs] for n in candidate}
        if cost_kind == "units"
        else _cost_curves(result, cost_kind)
    )

    def at(factor: float) -> dict[str, float]:
        return {n: min(bounds[n][1], max(bounds[n][0], factor * v)) for n, v in candidate.items()}

    most = {n: bounds[n][1] for n in candidate}
    if sum(_interp(v, xs, costs[n]) for n, v in most.items()) < needed * (1 - 1e-6):
        raise RegrowError(
            f"the {kind} budget {value:g} cannot be met with every target or group at its maximum sparsity "
            f"(max_sparsity or clamps); raise max_sparsity or ask for less."
        )
    lo, hi = 0.0, 1.0
    while sum(_interp(v, xs, costs[n]) for n, v in at(hi).items()) < needed and hi < 1e6:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        if sum(_interp(v, xs, costs[n]) for n, v in at(mid).items()) < needed:
            lo = mid
        else:
            hi = mid
    return at(hi)


def uniform_allocation(
    result: SensitivityResult,
    kind: str,
    value: float,
    max_sparsity: float = 0.9,
    *,
    min_sparsity: float = 0.0,
    clamps: dict[str, tuple[float, float]] | None = None,
) -> dict[str, float]:
    """The same sparsity everywhere (within clamps), as much as the budget asks (estimated from the cost curves)."""
    bounds = {c.name: (clamps or {}).get(c.name, (min_sparsity, max_sparsity)) for c in result.curves}
    fitted = fit_to_budget({c.name: 1.0 for c in result.curves}, result, kind, value, bounds)
    return {n: round(v, 4) for n, v in fitted.items()}


def search_allocation(
    result: SensitivityResult,
    kind: str,
    value: float,
    score: Callable[[dict[str, float]], float],
    *,
    candidates: int = 16,
    population: int = 4,
    sigma: float = 0.08,
    seed: int = 0,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.9,
    clamps: dict[str, tuple[float, float]] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(1 + lambda) evolution from the sensitivity and uniform allocations, scored by ``score`` (lower wins).

    ``score`` applies a candidate jointly (scaled to the budget) to a copy of the model and returns the
    calibration loss.
    """
    rng = random.Random(seed)
    start = sensitivity_allocation(
        result, kind, value, min_sparsity=min_sparsity, max_sparsity=max_sparsity, clamps=clamps
    )
    bounds = {n: (clamps or {}).get(n, (min_sparsity, max_sparsity)) for n in start}
    trail: list[dict[str, Any]] = []

    def evaluate(candidate: dict[str, float], origin: str) -> float:
        loss = score(candidate)
        trail.append({"origin": origin, "loss": loss, "allocation": dict(candidate)})
        return loss

    best = dict(start)
    best_loss = evaluate(best, "sensitivity")
    uniform = uniform_allocation(result, kind, value, max_sparsity, min_sparsity=min_sparsity, clamps=clamps)
    if len(trail) < candidates:
        loss = evaluate(uniform, "uniform")
        if loss < best_loss:
            best, best_loss = uniform, loss
    while len(trail) < candidates:
        for _ in range(min(population, candidates - len(trail))):
            child = {n: min(bounds[n][1], max(bounds[n][0], v + rng.gauss(0.0, sigma))) for n, v in best.items()}
            child = fit_to_budget(child, result, kind, value, bounds)  # every candidate meets the budget
            loss = evaluate(child, "mutation")
            if loss < best_loss:
                best, best_loss = child, loss
    return {n: round(v, 4) for n, v in best.items()}, trail


def allocate(
    method: str,
    result: SensitivityResult,
    kind: str,
    value: float,
    *,
    score: Callable[[dict[str, float]], float] | None = None,
    candidates: int = 16,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.9,
    clamps: dict[str, tuple[float, float]] | None = None,
    seed: int = 0,
) -> Allocation:
    """Per-target sparsities for ``method`` (``uniform``, ``sensitivity`` or ``search``)."""
    if method not in ALLOCATIONS:
        raise one_of("allocation", method, ALLOCATIONS)
    if not 0.0 <= min_sparsity <= max_sparsity < 1.0:
        raise RegrowError(
            "an allocation needs 0 <= min_sparsity <= max_sparsity < 1; "
            f"got min {min_sparsity!r}, max {max_sparsity!r}."
        )
    notes: list[str] = []
    if method == "uniform":
        per = uniform_allocation(result, kind, value, max_sparsity, min_sparsity=min_sparsity, clamps=clamps)
    elif method == "sensitivity":
        per = sensitivity_allocation(
            result, kind, value, min_sparsity=min_sparsity, max_sparsity=max_sparsity, clamps=clamps
        )
    elif method == "search":
        if score is None:
            raise RegrowError("allocation 'search' needs a way to score candidates on calibration data.")
        per, trail = search_allocation(
            result,
            kind,
            value,
            score,
            candidates=candidates,
            seed=seed,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
            clamps=clamps,
        )
        best = min(trail, key=lambda t: t["loss"])
        notes.append(
            f"search scored {len(trail)} candidates on the calibration data; the best "
            f"({best['origin']}) has loss {best['loss']:.4f}."
        )
    else:
        raise RegrowError("allocation 'global' is a ranking, not a per-target plan; prune with scope='global'.")
    return Allocation(method, result.pattern, {kind: value}, per, notes)


def clamps_from(spec: dict[str, list[float]] | None, names: list[str]) -> dict[str, tuple[float, float]]:
    """Per-target clamps from ``{glob: [min, max]}``; every glob must match a target."""
    from fnmatch import fnmatchcase

    out: dict[str, tuple[float, float]] = {}
    for pattern, bounds in (spec or {}).items():
        hits = [n for n in names if fnmatchcase(n, pattern)]
        if not hits:
            raise RegrowError(f"clamp {pattern!r} matches no target or group; they are: {', '.join(names[:10])}.")
        if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] < 1.0:
            raise RegrowError(f"clamp {pattern!r} must be [min, max] with 0 <= min <= max < 1; got {bounds!r}.")
        for n in hits:
            out[n] = (float(bounds[0]), float(bounds[1]))
    return out
