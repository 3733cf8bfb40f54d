"""Things that happen between optimizer steps during recovery (e.g. raising the sparsity).

A callback gets ``on_step_end(state)`` after every step. It may change the masks; it must then say so
by zeroing the optimizer state of newly masked weights (``MaskSet.clear_optimizer_state``).
``checkpoint_ready`` tells the loop whether the model is in its final form yet: best-checkpoint tracking
and early stopping wait until every callback is ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from regrow.errors import RegrowError
from regrow.prune import PruneSpec, compute_masks
from regrow.schedules import cubic

if TYPE_CHECKING:
    from regrow.recovery.records import TrainState


class Callback(Protocol):
    def on_train_start(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def checkpoint_ready(self, state: TrainState) -> bool: ...


@dataclass
class GradualPruning:
    """Raise the sparsity during recovery along Zhu & Gupta's cubic schedule.

    The sparsity rises from ``initial`` to ``final`` (fractions in [0, 1), initial below final) between
    ``begin`` and ``end`` (fractions of the recovery steps); masks are recomputed every ``every`` optimizer
    steps with the pattern, criterion and scope of ``spec`` (default: the spec the masks carry, as
    :func:`regrow.prune` returns them), and weights pruned earlier stay pruned. Bad values raise
    :class:`RegrowError` when the callback is made.

    Example:
        >>> masks = regrow.prune(model, 0.0)                  # start dense, record the spec
        >>> regrow.recover(model, masks, train, callbacks=[regrow.GradualPruning(final=0.9)])
    """

    final: float
    every: int = 10
    begin: float = 0.0
    end: float = 0.6
    initial: float = 0.0
    spec: PruneSpec | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.initial < self.final < 1.0:
            problems.append(f"0 <= initial < final < 1 (got initial {self.initial!r}, final {self.final!r})")
        if not (isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 1):
            problems.append(f"every >= 1 optimizer steps (got {self.every!r})")
        if not 0.0 <= self.begin <= self.end <= 1.0:
            problems.append(
                f"0 <= begin <= end <= 1, fractions of the recovery steps (got {self.begin!r}, {self.end!r})"
            )
        if problems:
            raise RegrowError("GradualPruning needs " + "; ".join(problems) + ".")

    def on_train_start(self, state: TrainState) -> None:
        if self.spec is None:
            if state.masks.spec is None:
                raise RegrowError(
                    "GradualPruning needs spec= or masks that carry their PruneSpec (as regrow.prune returns them)."
                )
            self.spec = state.masks.spec
        self._begin = int(self.begin * state.total_steps)
        self._end = max(self._begin, int(self.end * state.total_steps))
        self.current = state.masks.sparsity()
        self._update(state, self.initial)

    def target(self, step: int) -> float:
        return cubic(step, final=self.final, begin=self._begin, end=self._end, initial=self.initial)

    def on_step_end(self, state: TrainState) -> None:
        step = state.step
        if step % self.every == 0 or step == self._end:
            self._update(state, self.target(step))

    def checkpoint_ready(self, state: TrainState) -> bool:
        return state.step >= self._end and self.current >= self.final - 1e-9

    @torch.no_grad()
    def _update(self, state: TrainState, sparsity: float) -> None:
        if sparsity <= self.current + 1e-12:
            return
        assert self.spec is not None
        new = compute_masks(state.model, self.spec.with_sparsity(sparsity), state.train_data, previous=state.masks)
        for fqn, mask in new.items():
            state.masks[fqn].copy_(mask)
        state.masks.touch()
        state.masks.apply(state.model)
        state.masks.clear_optimizer_state(state.model, state.optimizer)
        self.current = sparsity
        state.masks.spec = self.spec.with_sparsity(sparsity)
