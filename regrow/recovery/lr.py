"""Learning-rate schedules for recovery: the absolute learning rate at every optimizer step.

* ``cosine`` (default): linear warm-up, then cosine decay to zero.
* ``constant``: linear warm-up, then flat.
* ``one_cycle``: warm up from peak/25 to a large peak over the first 30 % of the steps, then cosine
  anneal to peak/25e4 (Smith & Topin 2019; as a pruning recovery schedule: Le & Hua 2021, "Network
  Pruning That Matters"). The peak defaults to the original training's peak learning rate.
* ``rewind`` (chosen by ``rewind: lr`` or ``rewind: weights``): replay the original training's schedule
  from the rewind point for the length of recovery (Renda, Frankle & Carbin 2020, "Comparing Rewinding
  and Fine-tuning in Neural Network Pruning"). A recovery longer than what is left of the original
  schedule replays that rest more slowly, so that it ends where the original ended (see ``rewind_plan``).

The original schedule is described by :class:`OriginalSchedule`. When it is not given, regrow assumes a
cosine decay from ``recover.lr`` over twice the recovery epochs (so rewinding replays its second half);
a run whose baseline regrow trained itself uses that training's real schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from regrow.errors import RegrowError
from regrow.registry import Registry


@dataclass(frozen=True)
class OriginalSchedule:
    """How the model was first trained: peak ``lr`` and a schedule over ``epochs``."""

    lr: float
    epochs: float
    schedule: str = "cosine"  # cosine | step | constant
    warmup: float = 0.0  # fraction of the epochs spent warming up linearly
    milestones: tuple[float, ...] = field(default_factory=tuple)  # step: epochs where lr *= gamma
    gamma: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"lr > 0 (got {self.lr!r})")
        if not self.epochs > 0:
            problems.append(f"epochs > 0 (got {self.epochs!r})")
        if self.schedule not in ("cosine", "step", "constant"):
            problems.append(f"schedule cosine, step or constant (got {self.schedule!r})")
        if not 0.0 <= self.warmup < 1.0:
            problems.append(f"0 <= warmup < 1 (got {self.warmup!r})")
        if not self.gamma > 0:
            problems.append(f"gamma > 0 (got {self.gamma!r})")
        if problems:
            raise RegrowError("the original schedule needs " + "; ".join(problems) + ".")

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a (fractional) epoch of the original training."""
        warm = self.warmup * self.epochs
        if warm > 0 and epoch < warm:
            return self.lr * max(epoch, 1e-3 * warm) / warm
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        span = max(self.epochs - warm, 1e-9)
        progress = min(max((epoch - warm) / span, 0.0), 1.0)
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRContext:
    """What a schedule may use: the step count, the base rate, and the original training, if known."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    lr: float
    original: OriginalSchedule
    rewind_epoch: float | None = None  # where rewinding starts in the original schedule
    peak_lr: float | None = None  # one_cycle


LR_SCHEDULES: Registry[Callable[[LRContext], Callable[[int], float]]] = Registry("lr_schedule")


@LR_SCHEDULES.register("cosine")
def cosine(ctx: LRContext) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero (the default)."""

    def lr(step: int) -> float:
        if step < ctx.warmup_steps:
            return ctx.lr * (step + 1) / ctx.warmup_steps
        span = max(1, ctx.total_steps - ctx.warmup_steps)
        progress = min(1.0, (step - ctx.warmup_steps) / span)
        return ctx.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr


@LR_SCHEDULES.register("constant")
def constant(ctx: LRContext) -> Callable[[int], float]:
    """Linear warm-up, then the base rate throughout."""

    def lr(step: int) -> float:
        return ctx.lr * (step + 1) / ctx.warmup_steps if step < ctx.warmup_steps else ctx.lr

    return lr


ONE_CYCLE_WARMUP = 0.3


@LR_SCHEDULES.register("one_cycle")
def one_cycle(ctx: LRContext) -> Callable[[int], float]:
    """Warm up to a large peak (default: the original training's peak) over 30% of the steps, then anneal."""
    peak = ctx.peak_lr if ctx.peak_lr is not None else ctx.original.lr
    start, end = peak / 25.0, peak / 25.0 / 1e4
    rise = max(1, round(ONE_CYCLE_WARMUP * ctx.total_steps))

    def lr(step: int) -> float:
        if step < rise:
            return start + (peak - start) * 0.5 * (1.0 - math.cos(math.pi * step / rise))
        progress = min(1.0, (step - rise) / max(1, ctx.total_steps - rise))
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr


def rewind_plan(original: OriginalSchedule, recovery_epochs: float, rewind_epoch: float | None) -> tuple[float, float]:
    """Where the replay starts in the original training, and its pace (original epochs per recovery epoch).

    The replay runs from the rewind point (default: the original's end minus the recovery length, at least
    0) to the original's end. When recovery is longer than that stretch, the stretch is slowed down to fill
    it (pace below 1), so recovery never runs on past the original's end, where a cosine schedule is at 0.
    """
    start = rewind_epoch if rewind_epoch is not None else max(0.0, original.epochs - recovery_epochs)
    if recovery_epochs <= 0 and rewind_epoch is None:
        return start, 1.0  # nothing to replay
    if start >= original.epochs:
        raise RegrowError(
            f"rewind_epoch {start:g} is not inside the original training ({original.epochs:g} epochs); give a "
            f"rewind point from 0 to below {original.epochs:g}."
        )
    return start, min(1.0, (original.epochs - start) / max(recovery_epochs, 1e-9))


@LR_SCHEDULES.register("rewind")
def rewind(ctx: LRContext) -> Callable[[int], float]:
    """The original schedule replayed from the rewind point to its end (slowed down to fill a longer recovery)."""
    per_epoch = max(1, ctx.steps_per_epoch)
    start, pace = rewind_plan(ctx.original, ctx.total_steps / per_epoch, ctx.rewind_epoch)

    def lr(step: int) -> float:
        return ctx.original.lr_at(start + pace * step / per_epoch)

    return lr


def default_original(lr: float, epochs: int) -> OriginalSchedule:
    """The assumed original training when none is known: cosine from ``lr`` over twice the recovery."""
    return OriginalSchedule(lr=lr, epochs=2.0 * max(1, epochs), schedule="cosine")
