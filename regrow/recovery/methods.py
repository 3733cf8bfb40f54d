"""Recovery methods: the loss the pruned model is trained on, and what happens between steps.

A method returns named losses (``{"loss", "task_loss", "kd_loss", ...}``) so they flow straight into logs,
and the batch's :class:`~regrow.objectives.Scored` (outputs and metric); it may bring step callbacks. Register a
new one with ``@METHODS.register("name")``: a builder ``(options, teacher) -> (loss, callbacks)``.

* ``finetune``: the task loss: the objective's (``regrow.objectives``; default cross-entropy per sample, or per
  token for a language model, optional label smoothing). With ``objective=regrow.Embedding(...)`` the loss is
  the embedding's distance to the dense model's (an encoder without labels); ``regrow.Custom`` is the user's.
* ``distill``: alpha · T² · KL(teacher ‖ student at temperature T) + (1 − alpha) · task loss (Hinton et
  al. 2015); the teacher is the dense model. A language model is distilled token by token over the
  vocabulary, padding left out. Only the labels objective gets the KL term: an embedding's loss is distillation
  already, and a custom loss is the user's as given.
* ``rigl`` / ``set``: dynamic sparse training (regrow.recovery.dynamic), task loss, or distillation
  with ``distill: true``.
* ``share``: weight sharing (regrow.recovery.sharing), likewise.
* ``transfer``: a new target task; task loss plus feature distillation: the student's input to its
  classifier is pulled towards the dense source model's (``feature_weight`` times the relative squared
  error; default 0.1). examples/sparse_transfer.py shows it on digits 0-4 -> 5-9.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import regrow.distributed as distributed
from regrow.batches import forward
from regrow.errors import RegrowError
from regrow.objectives import Labels, Objective, Scored
from regrow.recovery.dynamic import DynamicSparsity
from regrow.recovery.sharing import WeightSharing
from regrow.registry import Registry
from regrow.select import final_classifier
from regrow.tasks import distillation_loss

Builder = Callable[[Any, nn.Module | None], tuple[Any, list[Any]]]
METHODS: Registry[Builder] = Registry("recovery method")


class TaskLoss:
    """The objective's loss (``regrow.objectives``): by default cross-entropy per sample or per real token, with
    optional label smoothing; :func:`use_objective` sets another."""

    def __init__(self, options: Any) -> None:
        self.objective: Objective = Labels(options.label_smoothing)

    def losses(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[dict[str, Tensor], Scored]:
        scored = self.objective.step(model, inputs, targets)
        return {"loss": scored.loss, "task_loss": scored.loss}, scored


class DistillLoss(TaskLoss):
    """alpha * T^2 * KL(teacher || student, T) + (1 - alpha) * task loss; an objective that already distils (an
    embedding) is used alone."""

    def __init__(self, options: Any, teacher: nn.Module | None) -> None:
        super().__init__(options)
        self.teacher = _frozen_teacher(teacher, "distillation")
        self.alpha = options.alpha
        self.temperature = options.temperature

    def losses(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[dict[str, Tensor], Scored]:
        out, scored = super().losses(model, inputs, targets)
        if not isinstance(self.objective, Labels):  # an embedding distils already; a custom loss is the user's
            return out, scored
        logits = scored.outputs
        # inference_mode: no autograd bookkeeping at all for the frozen teacher; the loop's autocast (if any)
        # runs it in the student's precision.
        with torch.inference_mode():
            teacher_logits = forward(self.teacher, inputs)
        if teacher_logits.shape != logits.shape:
            raise RegrowError(
                f"distillation needs the teacher's outputs in the student's shape; the teacher gives "
                f"{tuple(teacher_logits.shape)}, the student {tuple(logits.shape)}. A model with a new head for other "
                "classes learns from its teacher's features instead: use method 'transfer' (or 'finetune')."
            )
        kd = distillation_loss(logits, teacher_logits, self.temperature, targets)  # real tokens only
        out["kd_loss"] = kd
        out["loss"] = self.alpha * kd + (1.0 - self.alpha) * out["task_loss"]
        return out, scored


class FeatureDistillLoss(TaskLoss):
    """Task loss + weight * MSE between the student's and the teacher's inputs to the final classifier."""

    def __init__(self, options: Any, teacher: nn.Module | None) -> None:
        super().__init__(options)
        self.teacher = _frozen_teacher(teacher, "transfer (feature distillation)")
        self.weight = options.feature_weight
        self.layer = final_classifier(self.teacher)
        if self.layer is None:
            raise RegrowError("method 'transfer' needs a final Linear or Conv classifier to take features from.")

    def _features(self, model: nn.Module, inputs: Any) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        handle = model.get_submodule(self.layer).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        try:
            logits = forward(model, inputs)
        finally:
            handle.remove()
        return logits, captured[0]

    def losses(self, model: nn.Module, inputs: Any, targets: Tensor) -> tuple[dict[str, Tensor], Scored]:
        captured: list[Tensor] = []
        handle = (
            distributed.unwrap(model)
            .get_submodule(self.layer)
            .register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        )
        try:
            scored = self.objective.step(model, inputs, targets)
        finally:
            handle.remove()
        with torch.inference_mode():
            _, teacher_feats = self._features(self.teacher, inputs)
        teacher_feats = teacher_feats.clone()  # a normal tensor: the MSE's backward saves its target
        # Relative squared error, so the weight means the same whatever the scale of the features.
        feature = F.mse_loss(captured[0], teacher_feats) / teacher_feats.pow(2).mean().clamp(min=1e-8)
        task = scored.loss
        return {"loss": task + self.weight * feature, "task_loss": task, "feature_loss": feature}, scored


def _frozen_teacher(teacher: nn.Module | None, what: str) -> nn.Module:
    if teacher is None:
        raise RegrowError(
            f"{what} needs a teacher: pass teacher= (e.g. a copy of the dense model), prune with keep_dense=True "
            "so the masks carry one, or use method='finetune'."
        )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _loss(options: Any, teacher: nn.Module | None, default_distill: bool) -> TaskLoss:
    distill = options.distill if options.distill is not None else default_distill
    return DistillLoss(options, teacher) if distill else TaskLoss(options)


@METHODS.register("finetune", doc="Plain fine-tuning on the task loss (cross-entropy, optional label smoothing).")
def finetune(options: Any, teacher: nn.Module | None) -> tuple[Any, list[Any]]:
    return _loss(options, teacher, default_distill=False), []


@METHODS.register("distill", doc="Distillation from the dense model: alpha*T^2*KL + (1-alpha)*task loss.")
def distill(options: Any, teacher: nn.Module | None) -> tuple[Any, list[Any]]:
    return _loss(options, teacher, default_distill=True), []


@METHODS.register("rigl", doc="RigL dynamic sparsity: drop smallest weights, regrow by |gradient| (Evci et al. 2020).")
def rigl(options: Any, teacher: nn.Module | None) -> tuple[Any, list[Any]]:
    d = options.dynamic
    return _loss(options, teacher, False), [DynamicSparsity("gradient", d.update_every, d.drop_fraction, d.end)]


@METHODS.register("set", doc="SET dynamic sparsity: drop smallest weights, regrow at random (Mocanu et al. 2018).")
def set_(options: Any, teacher: nn.Module | None) -> tuple[Any, list[Any]]:
    d = options.dynamic
    return _loss(options, teacher, False), [DynamicSparsity("random", d.update_every, d.drop_fraction, d.end)]


@METHODS.register("share", doc="Weight sharing: k shared values per target, trained (Han et al. 2016).")
def share(options: Any, teacher: nn.Module | None) -> tuple[Any, list[Any]]:
    return _loss(options, teacher, False), [WeightSharing(options.share.k)]


@METHODS.register("transfer", doc="New target task: task loss + feature distillation from the dense source model.")
def transfer(options: Any, teacher: nn.Module | None) -> tuple[Any, list[Any]]:
    return FeatureDistillLoss(options, teacher), []


def use_objective(runner: Any, objective: Objective, teacher: nn.Module | None, method: str) -> None:
    """Give a method's loss ``objective`` (bound to the teacher); refuse the pairs that cannot work together."""
    if method == "transfer" and not isinstance(objective, Labels):
        raise RegrowError(
            "method 'transfer' trains a new classifier head on labels; it takes the Labels objective only. Recover "
            "an encoder by its embeddings with method 'finetune' or 'distill' and objective=regrow.Embedding(...)."
        )
    if not hasattr(runner, "objective"):
        raise RegrowError(
            f"method {method!r} computes its own loss and cannot take an objective; leave objective= out, or build "
            "the method's loss on regrow.recovery.methods.TaskLoss."
        )
    runner.objective = objective.bind(teacher)


@torch.no_grad()
def new_head(model: nn.Module, num_classes: int) -> str:
    """Replace the final classifier by a freshly initialised one with ``num_classes`` outputs; its name."""
    name = final_classifier(model)
    if name is None:
        raise RegrowError("the model has no final Linear/Conv classifier to replace.")
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise RegrowError(f"the final classifier {name!r} is a {type(old).__name__}; a new head needs an nn.Linear.")
    head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head)
    return name
