"""Stage 3, baseline: train the dense model when the recipe says so, keep a frozen copy as the teacher, and
measure the baseline the run is judged against."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regrow.batches import unpack
from regrow.components import build_augment
from regrow.config import RunConfig
from regrow.masks import MaskSet
from regrow.measure.metrics import classification_metrics
from regrow.pipeline.check import Checked
from regrow.pipeline.context import BASELINE_WARMUP, Timer, seed_everything
from regrow.pipeline.load import Loaded
from regrow.pipeline.measure import Snapshots
from regrow.prune import frozen_copy
from regrow.recovery import new_head, recover
from regrow.recovery.lr import OriginalSchedule, rewind_plan


@dataclass
class Baseline:
    """The dense teacher (None if the model cannot be copied), the new head's class count of a transfer run,
    and what the report says about the baseline."""

    teacher: nn.Module | None
    classes: int | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def set_baseline(loaded: Loaded, checked: Checked, snapshots: Snapshots, timer: Timer, progress: bool) -> Baseline:
    """Train (``model.train``), then take the baseline snapshot; a transfer run first moves to the new task."""
    cfg, model = loaded.cfg, loaded.model
    if cfg.model.train is not None:
        seed_everything(cfg.seed + 1)
        with timer.stage("train_baseline"):
            train_with_rewind_point(loaded, checked, progress)
    if checked.source is not None:
        return transfer_reference(loaded, checked, snapshots, timer, progress)
    snapshots.take(model, "baseline", checked.spec.targets)
    return Baseline(teacher=frozen_copy(model))


def train_with_rewind_point(loaded: Loaded, checked: Checked, progress: bool) -> None:
    """Train the baseline on the task (or a transfer run's source task), keeping the weights at the rewind
    point when weight rewinding needs them and no checkpoint gives them."""
    cfg, kwargs, source = loaded.cfg, checked.recover_kwargs, checked.source
    t = cfg.model.train
    assert t is not None
    base_train, base_val = (source.train, source.val) if source is not None else (loaded.train, loaded.val)
    point = None
    if cfg.recover.rewind == "weights" and "rewind_state" not in kwargs:
        # Renda et al.: rewind to the point as far from the end of training as recovery is long.
        epoch, _ = rewind_plan(OriginalSchedule(t.lr, t.epochs), cfg.recover.epochs, cfg.recover.rewind_epoch)
        point = RewindPoint(round(epoch * len(base_train)))
        kwargs["rewind_epoch"] = epoch
    train_baseline(cfg, loaded.model, base_train, base_val, loaded.search, progress, [point] if point else [])
    if point is not None:
        kwargs["rewind_state"] = point.state


def transfer_reference(
    loaded: Loaded, checked: Checked, snapshots: Snapshots, timer: Timer, progress: bool
) -> Baseline:
    """Transfer: the dense source model teaches features; the baseline to match is the dense model
    transferred to the target task with the same recovery budget."""
    cfg, model, source = loaded.cfg, loaded.model, checked.source
    assert source is not None
    extra: dict[str, Any] = {}
    with timer.stage("transfer_reference"):
        extra["source_test_accuracy"] = classification_metrics(model, source.test)["accuracy"]
        teacher = frozen_copy(model)
        classes = loaded.bundle.num_classes or count_classes(loaded.train)
        head = new_head(model, classes)
        reference = copy.deepcopy(model)
        seed_everything(cfg.seed + 4)
        opts = {k: v for k, v in checked.recover_kwargs.items() if k not in ("method", "rewind", "rewind_state")}
        recover(reference, MaskSet({}), loaded.train, loaded.val, method="finetune", progress=progress, **opts)
    snapshots.take(reference, "baseline", checked.spec.targets)
    del reference
    note = (
        f"Transfer: the model was trained on {source.description or 'the source data'} (test accuracy "
        f"{100 * extra['source_test_accuracy']:.2f}%), then given a new {classes}-class head `{head}`. The "
        "baseline is the dense model fine-tuned on the target task with the same budget; the pruned stage "
        "has the new, untrained head."
    )
    return Baseline(teacher=teacher, classes=classes, notes=[note], extra=extra)


def train_baseline(
    cfg: RunConfig,
    model: nn.Module,
    train: Any,
    val: Any,
    search: list[Path],
    progress: bool,
    callbacks: Sequence[Any] = (),
) -> None:
    """Train the model as the recipe's model.train says (AdamW, cosine with warm-up, no early stopping)."""
    t = cfg.model.train
    assert t is not None
    recover(
        model,
        MaskSet({}),
        train,
        val,
        method="finetune",
        epochs=t.epochs,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup=BASELINE_WARMUP,
        patience=None,
        augment=build_augment(t.augment, search),
        callbacks=callbacks,
        progress=progress,
    )


def count_classes(data: Any) -> int:
    """Number of classes in a labelled dataset: one more than the largest label."""
    return 1 + max(int(unpack(batch)[1].max()) for batch in data)


class RewindPoint:
    """Baseline-training callback that keeps the weights at one step (the weight-rewinding point)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state: dict[str, torch.Tensor] | None = None

    def _take(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_start(self, state: Any) -> None:
        if self.step == 0:
            self._take(state.model)

    def on_step_end(self, state: Any) -> None:
        if state.step == self.step:
            self._take(state.model)

    def checkpoint_ready(self, state: Any) -> bool:
        return True
