"""Task metrics: accuracy and mean cross-entropy loss of a classifier over a dataset."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regrow.batches import forward, model_device, to_device, unpack
from regrow.progress import bar


@torch.no_grad()
def classification_metrics(
    model: nn.Module,
    data: Iterable[Any],
    *,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Accuracy (in [0, 1]) and mean cross-entropy over every sample of ``data`` (eval mode).

    A sample whose logits hold a NaN or inf counts as wrong (the argmax of a NaN row is arbitrary), and makes the
    loss non-finite, which the divergence guard and the checks of the baseline and the export refuse.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    try:
        for batch in bar(data, desc, enabled=progress):
            inputs, targets = unpack(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            logits = forward(model, inputs)
            loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            hits = (logits.argmax(dim=-1) == targets) & torch.isfinite(logits).all(dim=-1)
            correct += int(hits.sum())
            count += int(targets.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0}
    return {"accuracy": correct / count, "loss": loss_sum / count, "samples": count}
