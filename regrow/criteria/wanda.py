"""Wanda: |W_ij| · ‖X_j‖₂, weights compared within each output row (Sun et al. 2023, "A Simple and Effective
Pruning Approach for Large Language Models"; reference code: locuslab/wanda ``lib/prune.py``).

A weight matters as much as the signal it carries: its magnitude times the norm of its input feature over
the calibration tokens. No weight is updated. Layers are pruned in the order the model calls them, each on
the inputs it gets from the already-pruned layers before it (:mod:`regrow.criteria.calibration`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from regrow.criteria.base import CRITERIA
from regrow.criteria.calibration import (
    CalibratedCriterion,
    Calibration,
    Statistics,
    check_finite,
    from_matrix,
    to_matrix,
)


class Wanda(CalibratedCriterion):
    """|w| · ‖x‖ from calibration inputs, compared within each output row (needs data; layer by layer)."""

    name = "wanda"
    scope = "row"  # the paper's comparison group: each output's weights compete among themselves

    def score(self, weight: Tensor, stats: Statistics, options: Calibration) -> Tensor:
        return weight.abs().float() * stats.norms.to(weight.device)[None, :]

    def solve(
        self, name: str, module: nn.Module, stats: Statistics, spec: Any, sparsity: float | None,
        previous: Tensor | None, options: Calibration,
    ) -> Tensor:  # fmt: skip
        from regrow.patterns import get_pattern

        check_finite(name, stats.norms)
        score = self.score(to_matrix(module, module.weight), stats, options)
        if previous is not None:  # weights pruned before stay pruned
            score = score.masked_fill(~to_matrix(module, previous), float("-inf"))
        pattern = get_pattern(spec.pattern)
        keep = pattern.make_masks({name: score}, sparsity=sparsity, threshold=spec.threshold, scope=spec.scope)[name]
        keep = from_matrix(module, keep)
        module.weight.mul_(keep)  # the layers after this one calibrate on its pruned output
        return keep


CRITERIA.register("wanda")(Wanda())
