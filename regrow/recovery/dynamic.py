"""Dynamic sparse training: the sparsity stays constant while the mask moves.

Every ``update_every`` steps, each target drops its ``d_t`` smallest-magnitude active weights and regrows
the same number among its inactive ones, with ``d_t = drop_fraction / 2 * (1 + cos(pi * t / T_end))``
of its active weights (cosine decay, no updates after ``end`` of the steps), but never more than it has
inactive weights (a lightly pruned target).

* **RigL** (Evci et al. 2020, "Rigging the Lottery"): regrow where the dense gradient is largest.
* **SET** (Mocanu et al. 2018, "Scalable training of artificial neural networks..."): regrow at random.

Regrown weights start at exactly zero and their optimizer state is reset; dropped weights are zeroed and
lose theirs. Works after pruning (as recovery) and from scratch: prune an untrained model with
``criterion="random", scope="layer"`` and recover with ``method="rigl"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from regrow.recovery.records import TrainState


@dataclass
class DynamicSparsity:
    regrow: str = "gradient"  # gradient (RigL) | random (SET)
    update_every: int = 100
    drop_fraction: float = 0.3
    end: float = 0.75

    def on_train_start(self, state: TrainState) -> None:
        self._end = int(self.end * state.total_steps)
        self.updates: list[dict[str, int]] = []

    def fraction(self, step: int) -> float:
        """Share of active weights replaced at ``step`` (cosine decay to zero at the end step)."""
        if step >= self._end or self._end == 0:
            return 0.0
        return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * step / self._end))

    def is_update_step(self, step: int) -> bool:
        # state.step counts finished steps; this backward belongs to step state.step + 1
        return (step + 1) % self.update_every == 0 and step + 1 < self._end

    @torch.no_grad()
    def on_after_backward(self, state: TrainState) -> None:
        if not self.is_update_step(state.step):
            return
        fraction = self.fraction(state.step + 1)
        changed = {}
        for fqn, mask in state.masks.items():
            param = state.model.get_parameter(fqn)
            n_active = int(mask.sum())
            # at most as many as there are inactive weights to regrow into, or sparsity would fall
            n = min(int(fraction * n_active), mask.numel() - n_active)
            if n == 0:
                continue
            flat_mask, flat_w = mask.view(-1), param.detach().view(-1)
            # Drop: the n smallest-magnitude active weights.
            drop_score = flat_w.abs().masked_fill(~flat_mask, float("inf"))
            dropped = torch.topk(drop_score, n, largest=False).indices
            new_mask = flat_mask.clone()
            new_mask[dropped] = False
            # Grow: n inactive weights (never one that was active a moment ago), by |gradient| or at random.
            if self.regrow == "gradient" and param.grad is not None:
                grow_score = param.grad.detach().view(-1).abs().float()
            else:
                grow_score = torch.rand(flat_mask.shape, device=flat_mask.device)
            grow_score = grow_score.masked_fill(flat_mask, float("-inf"))
            grown = torch.topk(grow_score, n, largest=True).indices
            new_mask[grown] = True
            _reset(state, param, grown)
            flat_mask.copy_(new_mask)
            flat_w[grown] = 0.0  # regrown weights start at zero
            changed[fqn] = n
        if changed:
            state.masks.touch()  # the loop's multipliers follow the new masks from this very step
            state.masks.apply(state.model)
            state.masks.clear_optimizer_state(state.model, state.optimizer)
            self.updates.append({"step": state.step + 1, "replaced": sum(changed.values())})

    def on_step_end(self, state: TrainState) -> None:
        pass

    def checkpoint_ready(self, state: TrainState) -> bool:
        """Only once the masks have moved: a checkpoint from before the first update (step ``update_every``)
        would hand back the pruned masks with none of the method's work in them. Ready from the start when no
        update falls before ``end``."""
        return state.step >= self.update_every or self.update_every >= self._end


def _reset(state: TrainState, param: Tensor, positions: Tensor) -> None:
    """Zero the optimizer state (momentum, Adam moments) of regrown weights."""
    for value in state.optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.view(-1)[positions] = 0.0
