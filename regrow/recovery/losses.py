"""Losses for recovery, returned as named parts so they flow straight into logging."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, scaled by T² (Hinton et al. 2015).

    The T² factor keeps the gradient size of the soft term independent of the temperature.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)
