"""``regrow.recover``: fine-tune a pruned model back to accuracy while its masks stay enforced."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError
from torch import nn

from regrow.batches import check_reiterable
from regrow.config import RecoverConfig, explain
from regrow.data.split import split_validation
from regrow.masks import MaskSet
from regrow.recovery.callbacks import GradualPruning
from regrow.recovery.loop import EpochRecord
from regrow.recovery.loop import train as train_loop
from regrow.recovery.methods import METHODS


@dataclass
class RecoveryResult:
    """What recovery did: the per-epoch curve, the epoch kept and why training ended.

    ``history[0]`` is the validation of the model as it came in (epoch 0: no training, so no train loss
    or learning rate). Accuracies are fractions in [0, 1].
    """

    history: list[EpochRecord]
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    steps: int
    stop_reason: str
    seconds: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = [asdict(h) for h in self.history]
        return out


def recover(
    model: nn.Module,
    masks: MaskSet,
    train: Iterable[Any],
    val: Iterable[Any] | None = None,
    *,
    method: str = "distill",
    teacher: nn.Module | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    lr_schedule: str = "cosine",
    warmup: float = 0.05,
    patience: int | None = 5,
    alpha: float = 0.5,
    temperature: float = 2.0,
    grad_clip: float | None = None,
    augment: Callable[[Any], Any] | None = None,
    val_fraction: float = 0.1,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> RecoveryResult:
    """Fine-tune a pruned model in place; masked weights stay exactly zero after every step.

    Args:
        model: the pruned model (as left by :func:`regrow.prune`).
        masks: its keep-masks.
        train: a DataLoader or any re-iterable of ``(inputs, targets)`` batches.
        val: validation batches for early stopping and checkpoint choice. Default: carved from ``train``
            (``val_fraction`` of a DataLoader's samples, or of a list's batches).
        method: ``"distill"`` (default) or ``"finetune"``; see ``regrow list methods``.
        teacher: distillation teacher; default: the frozen dense copy recorded by ``prune``.
        epochs, lr: training budget and peak learning rate.
        optimizer: ``"adamw"`` (default) or ``"sgd"`` (with ``momentum``).
        weight_decay, label_smoothing, grad_clip: regularization.
        lr_schedule: ``"cosine"`` (linear warm-up for ``warmup`` of the steps, then cosine to zero) or
            ``"constant"``.
        patience: stop after this many epochs without a validation gain (None: never). The best epoch
            is restored at the end either way.
        alpha, temperature: distillation loss ``alpha * T^2 * KL + (1 - alpha) * task loss``.
        augment: a callable applied to each training input batch.
        callbacks: step callbacks, e.g. :class:`regrow.GradualPruning`.
        progress: show progress bars (on a terminal only; each epoch is also logged at INFO level on the
            ``"regrow"`` logger, which the command line prints).

    Returns:
        A :class:`RecoveryResult`; the model holds the best checkpoint and is left in the train/eval mode
        it came in.

    Example:
        >>> masks = regrow.prune(model, 0.9)
        >>> result = regrow.recover(model, masks, train_loader, epochs=5)
        >>> result.best_val_accuracy  # doctest: +SKIP
    """
    try:
        options = RecoverConfig(
            method=method,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            lr_schedule=lr_schedule,
            warmup=warmup,
            patience=patience,
            alpha=alpha,
            temperature=temperature,
            grad_clip=grad_clip,
        )
    except ValidationError as exc:
        raise explain(exc, "recovery options") from None
    check_reiterable(train, "train")
    if val is None:
        train, val = split_validation(train, val_fraction)
    else:
        check_reiterable(val, "val")
    if teacher is None and method == "distill":
        teacher = masks.dense
    runner = METHODS.get(method)(options, teacher)
    started = time.perf_counter()
    history, summary = train_loop(
        model,
        masks,
        train,
        val,
        method=runner,
        options=options,
        augment=augment,
        callbacks=callbacks,
        progress=progress,
    )
    return RecoveryResult(history=history, seconds=time.perf_counter() - started, method=method, **summary)


__all__ = ["GradualPruning", "RecoveryResult", "recover", "METHODS"]
