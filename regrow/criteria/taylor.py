"""First-order Taylor criterion: |w · dL/dw| summed over a few batches.

The loss change when a weight is set to zero is, to first order, ``w · dL/dw`` (Molchanov et al. 2017,
"Pruning Convolutional Neural Networks for Resource Efficient Inference"; 2019, "Importance Estimation
for Neural Network Pruning"). Summing the absolute value per batch keeps opposite-signed batches from
cancelling.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

import regrow.distributed as distributed
from regrow.batches import forward, model_device, to_device, unpack
from regrow.criteria.base import CRITERIA
from regrow.errors import RegrowError
from regrow.tasks import task_loss

TAYLOR_BATCHES = 8


@CRITERIA.register("taylor")
def taylor(
    model: nn.Module,
    targets: list[str],
    data: Iterable[Any] | None = None,
    *,
    batches: int = TAYLOR_BATCHES,
) -> dict[str, Tensor]:
    """|w · dL/dw| summed over a few batches of data (cross-entropy loss; needs data)."""
    if data is None:
        raise RegrowError(
            "criterion 'taylor' needs data: pass data= (an iterable of (inputs, targets) batches) "
            "to regrow.prune, or choose criterion 'magnitude' or 'random'."
        )
    params = [model.get_parameter(f) for f in targets]
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = model_device(model)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in islice(data, batches):
            inputs, labels = unpack(batch)
            inputs, labels = to_device(inputs, device), to_device(labels, device)
            loss = task_loss(forward(model, inputs), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            if isinstance(data, distributed.Sharded):  # several processes: the gradient of the global batch
                distributed.sum_(grads, average=True)
            for s, p, g in zip(scores, params, grads):
                if g is not None:
                    s.add_((p.detach() * g).abs().float())
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise RegrowError("criterion 'taylor' got an empty data iterable; it needs at least one batch.")
    return dict(zip(targets, scores))
