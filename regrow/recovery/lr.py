"""Learning-rate schedules for recovery, as multipliers of the base rate per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable

from regrow.registry import Registry

LR_SCHEDULES: Registry[Callable[..., Callable[[int], float]]] = Registry("lr_schedule")


@LR_SCHEDULES.register("cosine")
def cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero (the default)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@LR_SCHEDULES.register("constant")
def constant(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then the base rate throughout."""

    def factor(step: int) -> float:
        return (step + 1) / warmup_steps if step < warmup_steps else 1.0

    return factor
