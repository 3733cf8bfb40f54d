"""Task metrics: an objective's metric (accuracy by default) and mean loss over a dataset (per sample, or per
token with perplexity)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

import regrow.distributed as distributed
from regrow.batches import model_device, to_device, unpack
from regrow.errors import raise_lost_stop
from regrow.objectives import Labels, Objective
from regrow.progress import bar


@torch.no_grad()
def classification_metrics(
    model: nn.Module,
    data: Iterable[Any],
    *,
    objective: Objective | None = None,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, Any]:
    """The objective's metric (key ``"accuracy"``, named by ``"metric"``) and mean loss over every unit of
    ``data`` (eval mode). The default objective (``regrow.objectives.Labels``): accuracy in [0, 1] and mean
    cross-entropy over samples, or for (batch, tokens, vocabulary) outputs over the real tokens, with their
    perplexity too (``regrow.tasks``).

    A unit whose logits hold a NaN or inf counts as wrong (the argmax of a NaN row is arbitrary), and makes the
    loss non-finite, which the divergence guard and the checks of the baseline and the export refuse. Outputs
    whose shape does not fit the targets are refused, never scored.
    """
    objective = objective if objective is not None else Labels()
    device = model_device(model)
    was_training = model.training
    model.eval()
    score, loss_sum, units, kind = 0.0, 0.0, 0, None
    try:
        for batch in bar(data, desc, enabled=progress):
            raise_lost_stop()  # a signal whose stop Python swallowed (regrow.errors.signalled)
            inputs, targets = unpack(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            scored = objective.measure(model, inputs, targets)
            kind = scored.unit
            loss_sum += float(scored.loss)
            score += float(scored.score)
            units += int(scored.units)
    finally:
        model.train(was_training)
    if isinstance(data, distributed.Sharded):  # several processes: each measured its part of every batch
        loss_sum, score, total = distributed.all_sum([loss_sum, score, units])
        units = round(total)
    if units == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0, "metric": objective.metric}
    out = {"accuracy": score / units, "loss": loss_sum / units, "samples": units, "metric": objective.metric}
    if kind == "tokens":
        out["perplexity"] = math.exp(min(out["loss"], 700.0))  # exp overflows a float beyond ~709
    return out
