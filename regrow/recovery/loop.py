"""The recovery training loop, in one file you can read top to bottom.

Masks are enforced twice per step, without forward hooks:

1. gradients of pruned weights are zeroed *before* ``optimizer.step()``, so no momentum or Adam moment
   ever builds up for them (their optimizer state stays exactly zero);
2. pruned weights are multiplied by the mask *after* the step, so nothing the optimizer does on its own
   (decoupled weight decay, numerical drift) can bring them back.

Validation runs after every epoch. The best epoch by validation accuracy is kept in memory and restored
at the end; early stopping ends training after ``patience`` epochs without a gain. Epoch 0 is the model
as it came in, so recovery can never hand back a model worse on validation than the one it was given.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from regrow.batches import model_device, to_device, unpack
from regrow.masks import MaskSet
from regrow.measure.metrics import classification_metrics
from regrow.progress import bar as progress_bar
from regrow.recovery.lr import LR_SCHEDULES

log = logging.getLogger("regrow")


@dataclass
class TrainState:
    """What callbacks may look at or change between steps."""

    model: nn.Module
    masks: MaskSet
    optimizer: torch.optim.Optimizer
    train_data: Iterable[Any]
    total_steps: int
    step: int = 0
    epoch: int = 0


@dataclass
class EpochRecord:
    epoch: int
    lr: float | None
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float
    val_accuracy: float
    sparsity: float
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)


def make_optimizer(model: nn.Module, options: Any) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)


def _rank(record: EpochRecord) -> tuple[float, float]:
    """Checkpoint order: higher validation accuracy, then lower validation loss.

    Accuracy on a small validation set moves in coarse steps; the loss breaks its frequent ties.
    """
    return (record.val_accuracy, -record.val_loss)


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    masks: MaskSet,
    train_data: Iterable[Any],
    val_data: Iterable[Any],
    *,
    method: Any,
    options: Any,
    augment: Callable[[Any], Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> tuple[list[EpochRecord], dict[str, Any]]:
    """Run recovery training; returns the per-epoch records and a summary (best epoch, stop reason)."""
    device = model_device(model)
    was_training = model.training
    optimizer = make_optimizer(model, options)
    steps_per_epoch = len(train_data) if hasattr(train_data, "__len__") else sum(1 for _ in train_data)
    total_steps = max(1, options.epochs * steps_per_epoch)
    warmup_steps = math.ceil(options.warmup * total_steps)
    lr_factor = LR_SCHEDULES.get(options.lr_schedule)(total_steps, max(1, warmup_steps) if warmup_steps else 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    state = TrainState(model, masks, optimizer, train_data, total_steps)
    pairs = masks.bind(model)
    masks.apply(model)
    for cb in callbacks:
        cb.on_train_start(state)

    def validate(epoch: int, started: float, train_sums: dict[str, float], seen: int, correct: int) -> EpochRecord:
        metrics = classification_metrics(model, val_data)
        return EpochRecord(
            epoch=epoch,
            lr=optimizer.param_groups[0]["lr"] if epoch else None,
            train_loss=train_sums["loss"] / seen if seen else None,
            train_accuracy=correct / seen if seen else None,
            val_loss=metrics["loss"],
            val_accuracy=metrics["accuracy"],
            sparsity=masks.sparsity(),
            seconds=time.perf_counter() - started,
            parts={k: v / seen for k, v in train_sums.items() if k != "loss"} if seen else {},
        )

    history = [validate(0, time.perf_counter(), {"loss": 0.0}, 0, 0)]
    ready = all(cb.checkpoint_ready(state) for cb in callbacks)
    best = {"epoch": 0, "key": _rank(history[0]), "state": _state_copy(model)} if ready else None
    stale, stop_reason = 0, "epoch budget used"

    for epoch in range(1, options.epochs + 1):
        state.epoch = epoch
        model.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        seen = correct = 0
        bar = progress_bar(train_data, f"recover {epoch}/{options.epochs}", enabled=progress, total=steps_per_epoch)
        for batch in bar:
            inputs, targets = unpack(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            if augment is not None:
                inputs = augment(inputs)

            losses, logits = method.losses(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            for param, mask in pairs:  # (1) pruned weights get no gradient, hence no optimizer state
                if param.grad is not None:
                    param.grad.mul_(mask)
            if options.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # (2) nothing the optimizer did can revive a pruned weight
                for param, mask in pairs:
                    param.mul_(mask)

            state.step += 1
            for cb in callbacks:
                cb.on_step_end(state)

            n = targets.shape[0]
            seen += n
            correct += int((logits.detach().argmax(dim=-1) == targets).sum())
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
            if not bar.disable:
                bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", refresh=False)

        record = validate(epoch, started, sums, seen, correct)
        history.append(record)
        log.info(
            "epoch %d/%d: train loss %.4f, val accuracy %.2f%%, val loss %.4f, sparsity %.2f%% (%.1f s)",
            epoch,
            options.epochs,
            record.train_loss or float("nan"),
            100 * record.val_accuracy,
            record.val_loss,
            100 * record.sparsity,
            record.seconds,
        )

        # Only a model in its final form (e.g. gradual pruning done) may become the kept checkpoint.
        if not all(cb.checkpoint_ready(state) for cb in callbacks):
            continue
        if best is None or _rank(record) > best["key"]:
            best = {"epoch": epoch, "key": _rank(record), "state": _state_copy(model)}
            stale = 0
        else:
            stale += 1
        if options.patience is not None and stale >= options.patience:
            stop_reason = f"early stopping: no validation gain for {options.patience} epochs"
            break

    if best is not None:
        model.load_state_dict(best["state"])
    model.train(was_training)
    kept = history[best["epoch"]] if best else history[-1]
    summary = {
        "best_epoch": kept.epoch,
        "best_val_accuracy": kept.val_accuracy,
        "epochs_run": history[-1].epoch,
        "steps": state.step,
        "stop_reason": stop_reason,
    }
    return history, summary
