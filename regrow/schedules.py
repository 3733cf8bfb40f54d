"""Sparsity schedules: pure functions of the step (the caller owns the counter, as in optax).

* ``one_shot`` — prune to the final sparsity at once, then recover.
* ``iterative`` — ``rounds`` rounds of prune → recover. Each round removes the same fraction of the
  weights still alive, so the density falls geometrically (Han et al. 2015).
* ``gradual`` — the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune"): sparsity rises
  from ``initial`` to ``final`` during recovery training, fast at first and slowly at the end; masks are
  updated every ``every`` steps.
"""

from __future__ import annotations

from regrow.registry import Registry

SCHEDULES: Registry[str] = Registry("schedule")
SCHEDULES.register("one_shot", doc="Prune to the final sparsity at once, then recover.")("one_shot")
SCHEDULES.register("iterative", doc="k rounds of prune -> recover; each round removes the same fraction of survivors.")(
    "iterative"
)
SCHEDULES.register("gradual", doc="Cubic sparsity ramp during recovery training (Zhu & Gupta 2017).")("gradual")


def one_shot(step: int, *, final: float) -> float:
    """The final sparsity at every step."""
    return final


def iterative(round_index: int, *, final: float, rounds: int) -> float:
    """Sparsity after round ``round_index`` (1-based) of ``rounds``: ``1 - (1 - final) ** (r / rounds)``."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    r = min(max(round_index, 0), rounds)
    return 1.0 - (1.0 - final) ** (r / rounds)


def cubic(step: int, *, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3``, held flat outside [t0, t1]."""
    if end <= begin:
        return final if step >= begin else initial
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3
