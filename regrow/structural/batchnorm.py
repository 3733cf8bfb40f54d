"""BatchNorm recalibration after removing channels (adaptive BN, Li et al. 2020, "EagleEye").

Removing channels shifts the distribution of every later layer's inputs, while the BatchNorm layers keep
running statistics measured on the dense model; the errors compound with depth, and a shrunk network can
fall to chance accuracy before any training. Re-estimating the running statistics on a few batches, with
no gradient and no weight change, restores much of it, and makes "accuracy right after pruning" mean
something (it also makes candidate selections comparable when searching).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from regrow.batches import forward, model_device, to_device, unpack

RECALIBRATION_BATCHES = 8


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable[Any], batches: int = RECALIBRATION_BATCHES) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches; returns batches used.

    Only the BatchNorm layers run in training mode (dropout and the rest stay in eval mode); weights are
    untouched. The model is left in the mode it came in.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    device = model_device(model)
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    used = 0
    try:
        for batch in islice(data, batches):
            inputs, _ = unpack(batch)
            forward(model, to_device(inputs, device))
            used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used
