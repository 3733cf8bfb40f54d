"""Task metrics: accuracy and mean cross-entropy loss over a dataset (per sample, or per token with perplexity)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from regrow.batches import forward, model_device, to_device, unpack
from regrow.progress import bar
from regrow.tasks import count, hits, task_loss, unit


@torch.no_grad()
def classification_metrics(
    model: nn.Module,
    data: Iterable[Any],
    *,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Accuracy (in [0, 1]) and mean cross-entropy over every scored unit of ``data`` (eval mode): samples, or
    for (batch, tokens, vocabulary) outputs the real tokens, with their perplexity too (``regrow.tasks``).

    A unit whose logits hold a NaN or inf counts as wrong (the argmax of a NaN row is arbitrary), and makes the
    loss non-finite, which the divergence guard and the checks of the baseline and the export refuse. Outputs
    whose shape does not fit the targets are refused, never scored.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    correct, loss_sum, units, kind = 0, 0.0, 0, None
    try:
        for batch in bar(data, desc, enabled=progress):
            inputs, targets = unpack(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            logits = forward(model, inputs)
            kind = unit(logits, targets)
            loss_sum += float(task_loss(logits.float(), targets, reduction="sum"))
            correct += int(hits(logits, targets))
            units += int(count(targets))
    finally:
        model.train(was_training)
    if units == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0}
    out = {"accuracy": correct / units, "loss": loss_sum / units, "samples": units}
    if kind == "tokens":
        out["perplexity"] = math.exp(min(out["loss"], 700.0))  # exp overflows a float beyond ~709
    return out
