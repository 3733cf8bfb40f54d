"""Recovery methods: what loss the pruned model is trained on.

A method returns named losses (``{"loss", "task_loss", "kd_loss"}``) so they flow straight into logs.
Register a new one with ``@METHODS.register("name")``; it receives the validated options and the teacher.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regrow.batches import forward
from regrow.errors import RegrowError
from regrow.recovery.losses import distillation_loss
from regrow.registry import Registry

METHODS: Registry[type] = Registry("recovery method")


@METHODS.register("finetune")
class Finetune:
    """Plain fine-tuning on the task loss (cross-entropy with optional label smoothing)."""

    def __init__(self, options: Any, teacher: nn.Module | None) -> None:
        self.label_smoothing = options.label_smoothing

    def losses(self, model: nn.Module, inputs: Any, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        logits = forward(model, inputs)
        task = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return {"loss": task, "task_loss": task}, logits


@METHODS.register("distill")
class Distill(Finetune):
    """Distillation from the dense model: alpha * KL(teacher || student, T) + (1 - alpha) * task loss."""

    def __init__(self, options: Any, teacher: nn.Module | None) -> None:
        super().__init__(options, teacher)
        if teacher is None:
            raise RegrowError(
                "recovery method 'distill' needs a teacher: pass teacher= (e.g. a copy of the dense model), "
                "prune with keep_dense=True so the masks carry one, or use method='finetune'."
            )
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha = options.alpha
        self.temperature = options.temperature

    def losses(self, model: nn.Module, inputs: Any, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        out, logits = super().losses(model, inputs, targets)
        with torch.no_grad():
            teacher_logits = forward(self.teacher, inputs)
        kd = distillation_loss(logits, teacher_logits, self.temperature)
        out["kd_loss"] = kd
        out["loss"] = self.alpha * kd + (1.0 - self.alpha) * out["task_loss"]
        return out, logits
