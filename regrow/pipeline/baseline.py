"""Stage 3, baseline: train the dense model when the recipe says so, keep a frozen copy as the teacher, and
measure the baseline the run is judged against.

A baseline that cannot be judged against is refused here, before anything is pruned:

* its test loss is not finite (the model's outputs are NaN or inf on the test data: broken weights);
* its test accuracy is at chance level, at most ``1 / classes`` plus ``CHANCE_MARGIN`` (3) standard errors of
  a guess on the n test samples, ``3 * sqrt(p * (1 - p) / n)`` with ``p = 1 / classes`` (10 classes, 360 test
  images: 14.74 %), while the recipe says the model is trained:

  - after ``model.train`` that learned nothing: its best-epoch rule kept epoch 0, the untrained model, since
    no trained epoch beat it on validation (accuracy, then loss): it diverged, collapsed or never moved (the
    issue's ``model.train.lr=1000`` run reported that untrained network as the baseline). A training whose
    kept epoch is a trained one, still at chance level, is under-trained, not broken (e.g. one epoch of a
    ViT): accepted, with a warning and a note in the report;
  - with ``model.checkpoint``: the weights do not fit the data.

  A model with neither, pruned untrained on purpose (sparse training from scratch, as ``digits_set_scratch``),
  is accepted at chance level with a note in the report.

Baseline training runs under recovery's divergence guard (``recover.guard``); when it diverges beyond the
guard's retries, the run stops here with the guard's paragraph, naming ``model.train.lr``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import regrow.distributed as distributed
from regrow.batches import unpack
from regrow.components import build_augment
from regrow.config import RunConfig
from regrow.errors import RegrowError
from regrow.masks import MaskSet
from regrow.measure import Snapshot
from regrow.measure.metrics import classification_metrics
from regrow.pipeline.check import Checked
from regrow.pipeline.context import BASELINE_WARMUP, Timer, seed_everything
from regrow.pipeline.load import Loaded
from regrow.pipeline.measure import Snapshots
from regrow.prune import frozen_copy
from regrow.recovery import Diverged, RecoveryResult, new_head, recover
from regrow.recovery.checkpoint import Checkpoints
from regrow.recovery.guard import RECOVERY_ADVICE
from regrow.recovery.lr import OriginalSchedule, rewind_plan

log = logging.getLogger("regrow")
CHANCE_MARGIN = 3.0  # standard errors of a guess's accuracy on the test samples, above 1 / classes


@dataclass
class Baseline:
    """The dense teacher (None if the model cannot be copied), the new head's class count of a transfer run,
    what the report says about the baseline, and the training that made it (baseline training, or a transfer
    run's reference; None when regrow trained nothing)."""

    teacher: nn.Module | None
    classes: int | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    training: RecoveryResult | None = field(default=None, repr=False)


def set_baseline(
    loaded: Loaded,
    checked: Checked,
    snapshots: Snapshots,
    timer: Timer,
    progress: bool,
    saves: Checkpoints | None = None,
) -> Baseline:
    """Train (``model.train``), then take the baseline snapshot; a transfer run first moves to the new task.
    The baseline is checked (``check_baseline``) before it is handed on. Training saves into ``saves``."""
    cfg, model = loaded.cfg, loaded.model
    trained = None
    if cfg.model.train is not None:
        seed_everything(cfg.seed + 1)
        with timer.stage("train_baseline"):
            trained = train_with_rewind_point(loaded, checked, progress, saves)
    if checked.source is not None:
        base = transfer_reference(loaded, checked, snapshots, timer, progress, saves)
    else:
        snapshots.take(model, "baseline", checked.spec.targets)
        base = Baseline(teacher=frozen_copy(model) if cfg.prune.keep_dense else None, training=trained)
    if trained is not None:
        base.extra["baseline_guard"] = trained.details["guard"]
    note = check_baseline(cfg, snapshots.taken["baseline"], base.classes or checked.classes, base.training)
    if note is not None:
        base.notes.append(note)
    return base


def chance_limit(classes: int, samples: int) -> float:
    """The highest test accuracy still at chance level: 1/classes plus CHANCE_MARGIN standard errors of guessing."""
    p = 1.0 / classes
    return p + CHANCE_MARGIN * math.sqrt(p * (1.0 - p) / samples)


def check_baseline(
    cfg: RunConfig, snap: Snapshot, classes: int | None, training: RecoveryResult | None = None
) -> str | None:
    """Refuse a baseline with a non-finite test loss, or one at chance level that the recipe says is trained
    (rules in the module docs); the report's note for one accepted at chance level, else None. ``training``: the
    run that made the baseline (its validation losses tell a broken training from a short one)."""
    if not (math.isfinite(snap.loss) and math.isfinite(snap.accuracy)):
        raise RegrowError(
            f"the baseline's test loss is {snap.loss} (accuracy {100 * snap.accuracy:.2f}%): the model's outputs are "
            "not finite on the test data, so its weights are broken (a checkpoint with NaN or inf values, or a "
            "baseline training that blew up). Nothing was pruned; fix the checkpoint or lower model.train.lr."
        )
    if classes is None or classes < 2 or not snap.samples or snap.accuracy > chance_limit(classes, snap.samples):
        return None
    level = (
        f"the baseline's test accuracy, {100 * snap.accuracy:.2f}%, is at chance level for {classes} classes (at most "
        f"{100 * chance_limit(classes, snap.samples):.2f}%: 1/{classes} plus {CHANCE_MARGIN:g} standard errors of "
        f"guessing on {snap.samples} samples)"
    )
    if cfg.model.train is not None:
        return _trained_at_chance(cfg, level, training)
    if cfg.model.checkpoint is not None:
        raise RegrowError(
            f"{level} with the weights of model.checkpoint {cfg.model.checkpoint!r}: they do not fit this data "
            "(another task, another label order or another input normalisation). Nothing was pruned; check the "
            "checkpoint and the data. To prune an untrained model on purpose, leave model.checkpoint out."
        )
    log.info("%s; the model is untrained (neither model.train nor model.checkpoint)", level)  # on purpose: a note
    return (
        f"The baseline is an untrained model: {level}. It was accepted because the recipe has neither model.train "
        "nor model.checkpoint (pruning an untrained model on purpose, e.g. sparse training from scratch), so the "
        "accuracy lost and won back are measured from chance."
    )


def _trained_at_chance(cfg: RunConfig, level: str, training: RecoveryResult | None) -> str:
    """A model.train baseline at chance level: refused when its training learned nothing, else a note."""
    t = cfg.model.train
    assert t is not None and training is not None
    before, after = training.history[0].val_loss, training.history[training.best_epoch].val_loss
    rollbacks = len(training.details["guard"]["rollbacks"])
    how = f"model.train: {t.epochs} epochs at lr {t.lr:g}" + (
        f", rolled back {rollbacks} times by the divergence guard" if rollbacks else ""
    )
    if training.best_epoch == 0:
        raise RegrowError(
            f"{level} after baseline training ({how}), which handed back the untrained model: none of its epochs "
            f"beat it on validation (validation loss untrained {before:.4f}, after the last epoch "
            f"{training.history[-1].val_loss:.4f}). The training learned nothing, and every comparison with this "
            "baseline would be meaningless. Nothing was pruned. Change model.train.lr (the built-in recipes use "
            "0.002 to 0.003), or check that the labels match the inputs."
        )
    log.warning("%s after %s: under-trained; train longer (model.train.epochs)", level, how)
    return (
        f"The baseline is under-trained: {level} after baseline training ({how}), which lowered the validation loss "
        f"from {before:.4f} to {after:.4f} but not yet the accuracy. The accuracy lost and won back are measured from "
        "near chance; train longer (model.train.epochs) for a baseline worth comparing with."
    )


def train_with_rewind_point(
    loaded: Loaded, checked: Checked, progress: bool, saves: Checkpoints | None = None
) -> RecoveryResult:
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
    callbacks = [point] if point else []
    result = train_baseline(cfg, loaded.model, base_train, base_val, loaded.search, progress, callbacks, saves)
    if point is not None:
        kwargs["rewind_state"] = point.state
    return result


def transfer_reference(
    loaded: Loaded,
    checked: Checked,
    snapshots: Snapshots,
    timer: Timer,
    progress: bool,
    saves: Checkpoints | None = None,
) -> Baseline:
    """Transfer: the dense source model teaches features; the baseline to match is the dense model
    transferred to the target task with the same recovery budget."""
    cfg, model, source = loaded.cfg, loaded.model, checked.source
    assert source is not None
    extra: dict[str, Any] = {}
    with timer.stage("transfer_reference"):
        extra["source_test_accuracy"] = classification_metrics(model, source.test)["accuracy"]
        teacher = frozen_copy(model) if cfg.prune.keep_dense else None
        classes = loaded.bundle.num_classes or count_classes(distributed.whole(loaded.train))
        head = new_head(model, classes)
        reference = copy.deepcopy(model)
        seed_everything(cfg.seed + 4)
        opts = {k: v for k, v in checked.recover_kwargs.items() if k not in ("method", "rewind", "rewind_state")}
        try:
            ref = recover(
                reference,
                MaskSet({}),
                loaded.train,
                loaded.val,
                method="finetune",
                progress=progress,
                checkpoint=saves,
                **opts,
            )
        except Diverged as exc:
            what = "the transfer reference (the dense model fine-tuned on the target task with recovery's settings)"
            raise RegrowError(exc.explain(what, RECOVERY_ADVICE)) from None
    extra["reference_guard"] = ref.details["guard"]
    snapshots.take(reference, "baseline", checked.spec.targets)
    del reference
    note = (
        f"Transfer: the model was trained on {source.description or 'the source data'} (test accuracy "
        f"{100 * extra['source_test_accuracy']:.2f}%), then given a new {classes}-class head `{head}`. The "
        "baseline is the dense model fine-tuned on the target task with the same budget; the pruned stage "
        "has the new, untrained head."
    )
    return Baseline(teacher=teacher, classes=classes, notes=[note], extra=extra, training=ref)


def train_baseline(
    cfg: RunConfig,
    model: nn.Module,
    train: Any,
    val: Any,
    search: list[Path],
    progress: bool,
    callbacks: Sequence[Any] = (),
    saves: Checkpoints | None = None,
) -> RecoveryResult:
    """Train the model as the recipe's model.train says (AdamW, cosine with warm-up, no early stopping), under
    the divergence guard of ``recover.guard``; a divergence beyond its retries names ``model.train.lr``."""
    t = cfg.model.train
    assert t is not None
    try:
        return recover(
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
            guard=cfg.recover.guard.model_dump(),
            callbacks=callbacks,
            progress=progress,
            checkpoint=saves,
        )
    except Diverged as exc:
        advice = (
            f"Try a lower model.train.lr (now {t.lr:g}; the built-in recipes use 0.002 to 0.003), or check the data "
            "and model.train.augment for extreme values"
        )
        raise RegrowError(exc.explain("baseline training (model.train)", advice)) from None


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
