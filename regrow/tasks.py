"""What a model's outputs are scored against: one class per sample, or one per token.

Two shapes of (outputs, targets) are understood, and nothing else is scored:

* **samples** — logits ``(batch, classes)`` with targets ``(batch,)``: image or sequence classification.
* **tokens** — logits ``(batch, tokens, vocabulary)`` with targets ``(batch, tokens)``: a language model
  (targets[:, t] is the token that logits[:, t] should predict, i.e. the inputs shifted left by one) or token
  classification. Targets equal to ``IGNORE`` (-100, as PyTorch and Hugging Face mark padding) are not scored.

Losses and accuracies are means over the scored units (samples or tokens); a language model's perplexity is
``exp`` of its mean token loss. Any other pairing of shapes is refused with the shapes named: a
(batch, tokens, vocabulary) tensor is never read as (batch, classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from regrow.errors import RegrowError

IGNORE = -100  # targets with this value (padding) are not scored


def unit(logits: Tensor, targets: Tensor) -> str:
    """``"samples"`` or ``"tokens"``: what each target scores; a RegrowError for shapes that fit neither."""
    if targets is None:
        raise RegrowError(
            "the batches carry no labels (a dict without a 'labels' entry), and this objective scores labels. An "
            "encoder without labels is recovered and evaluated by its embeddings: objective=regrow.Embedding(...)."
        )
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        got = str(targets.dtype).removeprefix("torch.") if isinstance(targets, Tensor) else type(targets).__name__
        raise RegrowError(
            f"the targets must be integer class or token indices; got {got}. Float targets (e.g. embeddings) "
            "are not labels regrow can score; distil an encoder's embeddings with objective=regrow.Embedding(...), or "
            "give your own loss with regrow.Custom(...)."
        )
    if logits.dim() == 2 and targets.dim() == 1 and logits.shape[0] == targets.shape[0]:
        return "samples"
    if logits.dim() == 3 and targets.dim() == 2 and logits.shape[:2] == targets.shape:
        return "tokens"
    raise RegrowError(
        f"the model's outputs {tuple(logits.shape)} do not fit the targets {tuple(targets.shape)}: regrow scores "
        "(batch, classes) logits against (batch,) class indices, or (batch, tokens, vocabulary) logits against "
        "(batch, tokens) token indices (the next token at each position; -100 for padding)."
    )


def flat(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(units, classes) logits and (units,) targets, whichever the shapes."""
    if unit(logits, targets) == "tokens":
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return logits, targets


def task_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy per sample or per real token (padding ignored), mean or sum. The mean over a batch with nothing
    to score (all padding) is 0 with zero gradients, not cross_entropy's NaN (which reads as a diverged step)."""
    logits, targets = flat(logits, targets)
    loss = F.cross_entropy(
        logits, targets.long(), ignore_index=IGNORE, label_smoothing=label_smoothing, reduction=reduction
    )
    if reduction != "mean":
        return loss
    return torch.where(scored(targets).any(), loss, loss.new_zeros(()))  # on the device: no wait for the host


def scored(targets: Tensor) -> Tensor:
    """Which targets count (not padding), flattened; uint8 class indices cannot hold -100: all count."""
    flat = targets.reshape(-1)
    return torch.ones_like(flat, dtype=torch.bool) if flat.dtype == torch.uint8 else flat != IGNORE


def hits(logits: Tensor, targets: Tensor) -> Tensor:
    """How many scored units the argmax gets right (a unit with a NaN or inf logit counts as wrong)."""
    logits, targets = flat(logits, targets)
    right = (logits.argmax(dim=-1) == targets) & torch.isfinite(logits).all(dim=-1)
    return (right & scored(targets)).sum()


def count(targets: Tensor) -> Tensor:
    """How many units are scored (samples, or tokens that are not padding)."""
    return scored(targets).sum()


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float, targets: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ student) on logits softened by ``temperature``, times T² (Hinton et al. 2015), averaged over
    samples, or over the real tokens of ``targets`` (padding is not distilled).

    The T² factor keeps the gradient size of the soft term independent of the temperature.
    """
    if student.dim() == 3:
        keep = scored(targets) if targets is not None else slice(None)
        student = student.reshape(-1, student.shape[-1])[keep]
        teacher = teacher.reshape(-1, teacher.shape[-1])[keep]
        if student.shape[0] == 0:  # all padding: nothing to distil (batchmean over no rows would be NaN)
            return student.sum()
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)
