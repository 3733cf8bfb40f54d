"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"; reference code
luuyin/OWL), an allocation for the calibrated criteria.

Layers whose Wanda scores ``|W_ij| · ‖X_j‖₂`` hold more outliers (scores above ``m`` times the layer's mean) carry
more of the model's function and are pruned less. With ``D_l`` the outlier ratio of target ``l``, the kept
fraction of each target is ``1 - sparsity + (d_l - mean(d))`` where ``d_l`` maps ``D_l`` linearly onto
``[0, 2·lam]``: their plain mean is the target sparsity, and every target's sparsity lies within ``2·lam`` of it
(within ``lam`` when the ratios spread evenly; the reference code's rule, there per transformer block, here per
target). ``regrow.prune(...,
allocation=owl(...).per_target)`` then scales the plan so that the parameter-weighted sparsity meets the budget
exactly.

Example:
    >>> plan = regrow.owl.owl(model, data, 0.7)  # doctest: +SKIP
    >>> regrow.prune(model, 0.7, criterion="wanda", data=data, allocation=plan.per_target)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from regrow.allocation import Allocation
from regrow.criteria.calibration import Calibration, check_finite, one_pass, to_matrix
from regrow.errors import RegrowError
from regrow.select import resolve_targets

M = 5.0  # a score is an outlier above this many times its layer's mean (the reference code's default)
LAMBDA = 0.08  # how far a target's sparsity may move from the target sparsity (the paper's LLaMA setting)


def outlier_ratio(scores: Tensor, m: float = M) -> float:
    """The fraction of ``scores`` above ``m`` times their mean."""
    scores = scores.float()
    return float((scores > m * scores.mean()).float().mean())


def owl_sparsities(ratios: dict[str, float], sparsity: float, lam: float = LAMBDA) -> dict[str, float]:
    """Per-target sparsities from outlier ratios: more outliers, less sparsity, within ``2·lam`` of ``sparsity``,
    in plain mean ``sparsity``. Equal ratios give ``sparsity`` everywhere."""
    low, high = min(ratios.values()), max(ratios.values())
    if high == low:
        return dict.fromkeys(ratios, sparsity)
    spread = {k: (v - low) / (high - low) * 2 * lam for k, v in ratios.items()}
    mean = sum(spread.values()) / len(spread)
    return {k: sparsity - (v - mean) for k, v in spread.items()}


def owl(
    model: nn.Module,
    data: Iterable[Any],
    sparsity: float,
    *,
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    m: float = M,
    lam: float = LAMBDA,
    calibration: Calibration | dict[str, Any] | None = None,
) -> Allocation:
    """OWL's per-target sparsities for ``model`` (dense, as it is) from the first calibration batches of ``data``."""
    if not 0.0 < sparsity < 1.0:
        raise RegrowError(f"sparsity must be in (0, 1); got {sparsity!r}.")
    if not 0.0 <= 2 * lam < min(sparsity, 1.0 - sparsity):
        raise RegrowError(
            f"lam must be at least 0 and 2 x lam below both the sparsity and 1 - sparsity, so that every target's "
            f"sparsity (within 2 x lam of the target) stays in (0, 1); got lam {lam!r} for sparsity {sparsity!r}."
        )
    if m <= 0:
        raise RegrowError(f"m (outliers lie above m times the layer's mean score) must be positive; got {m!r}.")
    options = calibration if isinstance(calibration, Calibration) else Calibration(**(calibration or {}))
    names = resolve_targets(model, targets, ignore)
    with torch.no_grad():
        stats = one_pass(model, names, data, criterion="owl", options=options, hessian=False)
        ratios = {}
        for f, s in stats.items():
            owner = f.rpartition(".")[0]
            weight = to_matrix(model.get_submodule(owner) if owner else model, model.get_parameter(f))
            check_finite(f, s.norms)
            ratios[f] = outlier_ratio(weight.abs().float() * s.norms.to(weight.device)[None, :], m)
    per = owl_sparsities(ratios, sparsity, lam)
    notes = [f"outlier ratio (scores above {m:g} x the mean) per target: " + ", ".join(
        f"{k} {100 * v:.2f}%" for k, v in ratios.items()
    )]  # fmt: skip
    return Allocation("owl", "unstructured", {"sparsity": sparsity}, {k: round(v, 6) for k, v in per.items()}, notes)
