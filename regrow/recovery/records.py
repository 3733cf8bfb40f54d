"""What the recovery loop keeps: the state callbacks see (``TrainState``), the per-epoch records, the kept
checkpoint and its order, early stopping, the stop reasons, and the position a checkpoint saves
(``regrow.recovery.checkpoint``)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from regrow.masks import MaskSet

LOSS_MIN_DELTA = 1e-3  # a relative fall of the validation loss smaller than this is no progress


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
    step: int = 0  # optimizer steps done when the epoch ended


def rank(record: EpochRecord) -> tuple[float, float]:
    """Checkpoint order: higher validation accuracy, then lower validation loss.

    Accuracy on a small validation set moves in coarse steps; the loss breaks its frequent ties.
    """
    return (record.val_accuracy, -record.val_loss)


def early_stop_reason(history: list[EpochRecord], patience: int) -> str:
    """Early stopping, and whether training and validation diverged meanwhile (over-fitting): training
    accuracy rose and is above validation accuracy while the validation loss went up."""
    window = history[-patience - 1 :]
    train = [h.train_accuracy for h in window if h.train_accuracy is not None]
    last = history[-1]
    gap = 100 * ((last.train_accuracy or 0.0) - last.val_accuracy)
    if len(train) >= 2 and train[-1] > train[0] and last.val_loss > window[0].val_loss and gap > 0:
        return (
            f"early stopping: no validation gain for {patience} epochs while training accuracy kept rising "
            f"(over-fitting: train - val gap {gap:.1f} points)"
        )
    return f"early stopping: no validation gain for {patience} epochs"


@dataclass
class Kept:
    """The best checkpoint so far: its epoch, its ``rank`` key, and a copy of the weights and masks."""

    epoch: int
    key: tuple[float, float]
    state: dict[str, Any]


@dataclass
class Patience:
    """Epochs without progress so far, and the lowest validation loss, for early stopping."""

    lowest_loss: float
    stale: int = 0

    def update(self, record: EpochRecord, better: bool) -> None:
        """Count ``record``'s epoch as stale, or reset the count."""
        # Patience counts epochs in which neither validation accuracy (the kept checkpoint's key) nor the
        # validation loss improved: on a small validation set accuracy moves in coarse steps while the loss
        # still shows progress.
        improved_loss = record.val_loss < self.lowest_loss * (1.0 - LOSS_MIN_DELTA)
        self.lowest_loss = min(self.lowest_loss, record.val_loss)
        self.stale = 0 if better or improved_loss else self.stale + 1


def stop_reason(
    history: list[EpochRecord], stale: int, options: Any, baseline_val_accuracy: float | None, started_all: float
) -> str | None:
    """Why training ends after the last epoch of ``history`` (target reached, early stopping, time up), or None."""
    record = history[-1]
    within = options.stop_when.within if options.stop_when else None
    seconds = options.stop_when.seconds if options.stop_when else None
    if (
        within is not None
        and baseline_val_accuracy is not None
        and record.val_accuracy >= baseline_val_accuracy - within / 100.0
    ):
        return (
            f"target reached: validation accuracy {100 * record.val_accuracy:.2f}% is within "
            f"{within:g} points of the baseline's {100 * baseline_val_accuracy:.2f}%"
        )
    if options.patience is not None and stale >= options.patience:
        return early_stop_reason(history, options.patience)
    if seconds is not None and time.perf_counter() - started_all >= seconds:
        return f"wall-time budget of {seconds:g} s used"
    return None


@dataclass
class Position:
    """Where training is: the records so far, the kept checkpoint, early stopping's count, the next epoch, the
    stop reason once there is one, and the seconds trained (``stop_when.seconds`` counts them over a resume)."""

    history: list[EpochRecord]
    best: Kept | None
    patience: Patience
    epoch: int = 1
    reason: str | None = None
    seconds: float = 0.0

    def plain(self) -> dict[str, Any]:
        """As a checkpoint holds it."""
        best = self.best
        return {
            "history": [asdict(h) for h in self.history],
            "best": None if best is None else {"epoch": best.epoch, "key": best.key, "state": best.state},
            "patience": asdict(self.patience),
            "epoch": self.epoch,
            "reason": self.reason,
            "seconds": self.seconds,
        }

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> Position:
        best = d["best"]
        return cls(
            [EpochRecord(**h) for h in d["history"]],
            None if best is None else Kept(best["epoch"], tuple(best["key"]), best["state"]),  # type: ignore[arg-type]
            Patience(**d["patience"]),
            d["epoch"],
            d["reason"],
            d["seconds"],
        )
