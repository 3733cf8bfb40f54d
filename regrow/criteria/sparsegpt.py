"""SparseGPT: prune each layer and update its remaining weights to keep its output (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"; reference code:
IST-DASLab/sparsegpt ``sparsegpt.py``).

For a layer with calibration inputs X, the Hessian of its squared output error is H = 2XᵀX. Columns are
visited left to right in blocks: a block's mask keeps the weights of highest ``w² / [H⁻¹]_jj²`` (the
optimal-brain-surgeon saliency), then each column's pruning error is spread over the columns to its right
through the rows of the Cholesky factor of H⁻¹, and the blocks to the right get the whole block's update
at once. Layers go in the order the model calls them, each on the outputs of the pruned layers before it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
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
from regrow.errors import RegrowError
from regrow.patterns import pruned_count


def inverse_hessian_factor(gram: Tensor, dampening: float, name: str = "") -> Tensor:
    """Upper Cholesky factor of (XᵀX + λI)⁻¹, λ = ``dampening`` × mean diagonal; dead inputs (a zero diagonal)
    get a diagonal of 1."""
    h = gram.to("cpu", torch.float64)  # float64 on the CPU: MPS has no float64
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * torch.diagonal(h).mean())
    try:
        inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inv, upper=True).to(gram.device, torch.float32)
    except torch.linalg.LinAlgError as exc:
        raise RegrowError(
            f"sparsegpt could not factor the Hessian of {name or 'a target'} ({exc}); raise the calibration "
            "dampening (e.g. 0.1) or use more calibration batches."
        ) from exc


def saliency(weight2d: Tensor, factor: Tensor) -> Tensor:
    """w² / [H⁻¹]_jj², the weight's optimal-brain-surgeon pruning cost."""
    return weight2d.float() ** 2 / torch.diagonal(factor)[None, :] ** 2


def sparsegpt_layer(
    weight2d: Tensor,
    gram: Tensor,
    *,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    scope: str = "layer",
    forced: Tensor | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    name: str = "",
) -> tuple[Tensor, Tensor]:
    """One layer: (keep-mask, updated weight), both (outputs, inputs).

    ``nm``: keep n of every m adjacent columns in each row; otherwise ``sparsity`` of the weights go, chosen per
    block of columns over the whole block (``scope="layer"``, as the reference code) or within each row of it
    (``"row"``), exactly ``pruned_count`` of the layer (or row). ``forced``: True where an earlier mask pruned.
    """
    w = weight2d.detach().float().clone()
    rows, cols = w.shape
    dead = torch.diagonal(gram) == 0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(gram, dampening, name)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    if nm is not None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # a group never straddles two blocks
    starts = list(range(0, cols, block_size))
    widths = [min(block_size, cols - s) for s in starts]
    # Weights an earlier mask forces out are pruned where they are; the others the budget still needs ("extra":
    # max(0, target - forced), in the layer or in each row) are spread over the blocks in proportion to their
    # columns, so the total is exactly max(target, forced) however unevenly the forced ones lie.
    forced_rows = forced.sum(1) if forced is not None else torch.zeros(rows, dtype=torch.long, device=w.device)
    extra_layer = max(0, pruned_count(sparsity, rows * cols) - int(forced_rows.sum()))
    extra_rows = (pruned_count(sparsity, cols) - forced_rows).clamp(min=0)
    done_layer, done_rows = 0, torch.zeros(rows, dtype=torch.long, device=w.device)
    for i1, width in zip(starts, widths):
        i2 = i1 + width
        w1 = w[:, i1:i2].clone()
        h1 = hinv[i1:i2, i1:i2]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)  # True = pruned
        if nm is None:
            cost = saliency(w1, h1)
            if forced is not None:
                cost = cost.masked_fill(forced[:, i1:i2], float("-inf"))
            if scope == "layer":
                must = int(forced[:, i1:i2].sum()) if forced is not None else 0
                extra = min(math.ceil(extra_layer * i2 / cols - 1e-9) - done_layer, rows * width - must)
                lowest = torch.sort(cost.reshape(-1), stable=True).indices[: must + extra]  # ties: earlier goes
                mask1.view(-1)[lowest] = True
                done_layer += extra
            else:
                must = forced[:, i1:i2].sum(1) if forced is not None else torch.zeros_like(done_rows)
                goal = torch.ceil(extra_rows * i2 / cols - 1e-9).long()
                extra = torch.minimum(goal - done_rows, width - must).clamp(min=0)
                order = torch.sort(cost, dim=1, stable=True).indices
                ranks = torch.arange(width, device=w.device)[None, :] < (must + extra)[:, None]
                mask1.scatter_(1, order, ranks)
                done_rows += extra
        for i in range(width):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                cost = saliency(w1[:, i : i + m], h1[i : i + m, i : i + m])
                if forced is not None:
                    cost = cost.masked_fill(forced[:, i1 + i : i1 + i + m], float("-inf"))
                lowest = torch.sort(cost, dim=1, stable=True).indices[:, : m - n]
                mask1[:, i : i + m].scatter_(1, lowest, True)
            col = w1[:, i]
            d = h1[i, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    keep = ~pruned
    return keep, w * keep


class SparseGPT(CalibratedCriterion):
    """Prune and update each layer from its calibration Hessian (needs data; layer by layer)."""

    name = "sparsegpt"
    scope = "layer"  # the reference code picks each block's mask over all of its rows
    hessian = True

    def score(self, weight: Tensor, stats: Statistics, options: Calibration) -> Tensor:
        """w² / [H⁻¹]_jj² of the weights as they are (no update)."""
        assert stats.gram is not None
        return saliency(weight, inverse_hessian_factor(stats.gram, options.dampening).to(weight.device))

    def solve(
        self, name: str, module: nn.Module, stats: Statistics, spec: Any, sparsity: float | None,
        previous: Tensor | None, options: Calibration,
    ) -> Tensor:  # fmt: skip
        from regrow.patterns import NM, get_pattern

        assert stats.gram is not None and sparsity is not None
        check_finite(name, stats.gram)
        pattern = get_pattern(spec.pattern)
        weight = to_matrix(module, module.weight)
        keep, new = sparsegpt_layer(
            weight,
            stats.gram.to(weight.device),
            sparsity=sparsity,
            nm=(pattern.n, pattern.m) if isinstance(pattern, NM) else None,
            scope=spec.scope,
            forced=None if previous is None else ~to_matrix(module, previous),
            block_size=options.block_size,
            dampening=options.dampening,
            name=repr(name),
        )
        module.weight.copy_(from_matrix(module, new).to(module.weight.dtype))
        return from_matrix(module, keep)


CRITERIA.register("sparsegpt")(SparseGPT())
