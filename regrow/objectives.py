"""What recovery minimises and evaluation reports for one kind of model: an objective.

* :class:`Labels` (the default): cross-entropy against class indices, or token indices for a language model
  (``regrow.tasks``); the metric is accuracy (per sample or per real token), with perplexity for tokens.
* :class:`Embedding`: for encoders that have no labels. The student's embedding (a named output, e.g. a
  sentence embedding, mean-pooled over the real tokens when it is per token) is pulled towards the dense
  model's on the same inputs, by cosine distance or relative squared error; the metric is the mean cosine
  similarity to the dense model's embedding.
* :class:`Custom`: a user's loss and metric.

An objective turns one batch into a :class:`Scored`: the model's outputs, the loss, and the metric summed over
the batch's units (samples, or real tokens) with their count, so that epochs and datasets average exactly over
units. Evaluation and recovery keep the metric where they keep accuracy (``Snapshot.accuracy``,
``RecoveryResult.best_val_accuracy``) and name it (``Snapshot.metric``): higher is better.

Example:
    >>> encoder_masks = regrow.prune(encoder, 0.5)
    >>> regrow.recover(encoder, encoder_masks, sentences, objective=regrow.Embedding(pooling="mean"))  # doctest: +SKIP
    >>> regrow.evaluate(encoder, held_out, objective=regrow.Embedding(teacher=dense)).accuracy  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regrow.batches import batch_size, forward, output_tensor
from regrow.errors import RegrowError
from regrow.tasks import count, hits, task_loss, unit

POOLINGS = ("mean", "first", "none")
EMBEDDING_LOSSES = ("cosine", "mse")


@dataclass
class Scored:
    """One batch under an objective: ``loss`` is the batch's mean (``measure``: the sum over its units),
    ``score`` the metric summed over ``units`` units; ``unit`` says what a unit is."""

    outputs: Tensor
    loss: Tensor
    score: Tensor
    units: Tensor
    unit: str = "samples"
    labelled: bool = False  # outputs are logits over classes (the divergence guard's floor is ln classes)


class Objective:
    """Base class: ``step`` scores a training batch (mean loss, with gradients); ``measure`` an evaluation batch
    (summed loss)."""

    metric: ClassVar[str] = "accuracy"

    def bind(self, teacher: nn.Module | None) -> Objective:
        """This objective with the dense model to learn from or compare with (only :class:`Embedding` needs it)."""
        return self

    def step(self, model: nn.Module, inputs: Any, targets: Any) -> Scored:
        raise NotImplementedError

    def measure(self, model: nn.Module, inputs: Any, targets: Any) -> Scored:
        scored = self.step(model, inputs, targets)
        return replace(scored, loss=scored.loss.detach().double() * scored.units.double())


@dataclass
class Labels(Objective):
    """Cross-entropy against class or token indices (padding, -100, left out); accuracy of the argmax.
    Evaluation uses the plain cross-entropy (no label smoothing), so that losses compare across runs."""

    label_smoothing: float = 0.0

    def step(self, model: nn.Module, inputs: Any, targets: Any) -> Scored:
        logits = forward(model, inputs)
        kind = unit(logits, targets)
        loss = task_loss(logits, targets, self.label_smoothing)
        return Scored(logits, loss, hits(logits.detach(), targets), count(targets), kind, labelled=True)

    def measure(self, model: nn.Module, inputs: Any, targets: Any) -> Scored:
        logits = forward(model, inputs)
        kind = unit(logits, targets)
        loss = task_loss(logits.float(), targets, reduction="sum")
        return Scored(logits, loss.double(), hits(logits, targets), count(targets), kind, labelled=True)


@dataclass
class Embedding(Objective):
    """Embedding (hidden-state) distillation from the dense model, for encoders without labels.

    Args:
        output: which output is the embedding: the name of an output field (``"pooler_output"``,
            ``"last_hidden_state"``, a sentence-transformers ``"sentence_embedding"``), a callable
            ``(outputs, inputs) -> Tensor``, or None for the model's tensor output (a Hugging Face encoder's
            first output, ``last_hidden_state``).
        pooling: for a per-token output ``(batch, tokens, features)``: ``"mean"`` over the real tokens of the
            inputs' ``attention_mask`` (sentence-transformers' pooling), ``"first"`` token (BERT's [CLS]), or
            ``"none"``: the whole ``(tokens, features)`` block is one vector.
        loss: ``"cosine"`` (1 - cosine similarity, per sample) or ``"mse"`` (squared error relative to the
            mean square of the dense model's embedding).
        teacher: the dense model; :func:`regrow.recover` gives it the teacher it distils from,
            :func:`regrow.evaluate` needs it here.
    """

    output: str | Callable[[Any, Any], Tensor] | None = None
    pooling: str = "mean"
    loss: str = "cosine"
    teacher: nn.Module | None = None

    metric: ClassVar[str] = "cosine similarity"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise RegrowError(f"Embedding pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}.")
        if self.loss not in EMBEDDING_LOSSES:
            raise RegrowError(f"Embedding loss must be one of {', '.join(EMBEDDING_LOSSES)}; got {self.loss!r}.")
        if self.output is not None and not (isinstance(self.output, str) or callable(self.output)):
            raise RegrowError(
                f"Embedding output must be the name of an output field, a callable (outputs, inputs) -> Tensor, or "
                f"None; got {type(self.output).__name__}."
            )

    def bind(self, teacher: nn.Module | None) -> Embedding:
        if self.teacher is not None or teacher is None:
            return self
        return replace(self, teacher=teacher)

    def embed(self, model: nn.Module, inputs: Any) -> Tensor:
        """The model's embedding of ``inputs``: ``(batch, features)``."""
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        emb = _pick(out, inputs, self.output)
        if emb.dim() == 3 and self.pooling != "none":
            if self.pooling == "first":
                return emb[:, 0]
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            if mask is None:
                return emb.mean(dim=1)
            weight = mask[..., None].to(emb.dtype)
            return (emb * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        return emb.reshape(emb.shape[0], -1) if emb.dim() != 2 else emb

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            raise RegrowError(
                "the Embedding objective compares with the dense model's embeddings, and it has none: pass "
                "Embedding(teacher=dense_model) to evaluate(); recover() uses its teacher (teacher=, or the dense "
                "copy prune keeps with keep_dense=True)."
            )
        self.teacher.eval()
        return self.teacher

    def step(self, model: nn.Module, inputs: Any, targets: Any) -> Scored:
        student = self.embed(model, inputs)
        with torch.inference_mode():
            dense = self.embed(self._teacher(), inputs)
        dense = dense.clone()  # a normal tensor: the loss's backward saves it
        if dense.shape != student.shape:
            raise RegrowError(
                f"the embeddings differ in shape: the model gives {tuple(student.shape)}, the dense model "
                f"{tuple(dense.shape)}. Embedding distillation needs the same output width (prune inside the "
                "encoder; keep the output features)."
            )
        cos = F.cosine_similarity(student.float(), dense.float(), dim=-1)
        if self.loss == "cosine":
            loss = (1.0 - cos).mean()
        else:
            loss = F.mse_loss(student.float(), dense.float()) / dense.float().pow(2).mean().clamp(min=1e-8)
        n = torch.tensor(student.shape[0], device=student.device)
        return Scored(student, loss, cos.detach().sum(), n)


@dataclass
class Custom(Objective):
    """A user's objective: ``loss(outputs, targets) -> scalar Tensor`` (what a step minimises) and optionally
    ``metric(outputs, targets) -> Tensor`` of per-sample scores, higher is better (reported as their mean;
    default: minus the loss). ``outputs`` is what regrow reads from the model: its logits, or its first
    output. ``name`` names the metric in reports."""

    loss: Callable[[Tensor, Any], Tensor]
    metric_fn: Callable[[Tensor, Any], Tensor] | None = None
    name: str = "metric"

    def __post_init__(self) -> None:
        if not callable(self.loss) or (self.metric_fn is not None and not callable(self.metric_fn)):
            raise RegrowError("Custom needs a callable loss(outputs, targets) and, if given, a callable metric_fn.")

    @property
    def metric(self) -> str:  # type: ignore[override]
        return self.name if self.metric_fn is not None else "minus the loss"

    def step(self, model: nn.Module, inputs: Any, targets: Any) -> Scored:
        outputs = forward(model, inputs)
        loss = self.loss(outputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise RegrowError(
                f"the custom loss must return a scalar tensor; it returned {_describe(loss)}. Reduce it (e.g. .mean())."
            )
        loss = loss.reshape(())
        rows = outputs.shape[0] if outputs.dim() else batch_size(inputs)
        if self.metric_fn is None:
            return Scored(outputs, loss, -loss.detach() * rows, torch.tensor(rows, device=loss.device))
        with torch.no_grad():
            scores = self.metric_fn(outputs.detach(), targets)
        if not isinstance(scores, Tensor) or scores.dim() == 0:
            raise RegrowError(
                f"the custom metric must return one score per sample (a 1-D tensor); it returned {_describe(scores)}."
            )
        scores = scores.reshape(-1).double()
        return Scored(outputs, loss, scores.sum(), torch.tensor(scores.numel(), device=scores.device))


def _describe(x: Any) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"


def _pick(out: Any, inputs: Any, output: str | Callable[[Any, Any], Tensor] | None) -> Tensor:
    """The embedding tensor among a model's outputs."""
    if callable(output):
        picked = output(out, inputs)
    elif output is None:
        picked = output_tensor(out)
    elif isinstance(out, Mapping) and output in out:
        picked = out[output]
    else:
        picked = getattr(out, output, None)
        if picked is None:
            fields = ", ".join(map(repr, out)) if isinstance(out, Mapping) else f"a {type(out).__name__}"
            raise RegrowError(f"the model's output has no field {output!r}; it has: {fields}.")
    if not isinstance(picked, Tensor) or picked.dim() < 2:
        raise RegrowError(
            f"the embedding must be a tensor of shape (batch, features) or (batch, tokens, features); got "
            f"{_describe(picked)}."
        )
    return picked


def as_scored(result: Any, targets: Any) -> Scored:
    """A method's second result as a :class:`Scored`: methods registered before objectives return logits."""
    if isinstance(result, Scored):
        return result
    kind = unit(result, targets)
    return Scored(result, torch.zeros(()), hits(result.detach(), targets), count(targets), kind, labelled=True)


def objective_of(method: Any) -> Objective:
    """The objective a recovery method's loss uses (Labels for methods that do not say)."""
    objective = getattr(method, "objective", None)
    return objective if isinstance(objective, Objective) else Labels()


def shown(metric: str, value: float | None) -> str:
    """A metric's value as logs and reports print it: accuracy in percent, anything else as it is."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"


def check_objective(objective: Any) -> Objective:
    if objective is None:
        return Labels()
    if not isinstance(objective, Objective):
        raise RegrowError(
            f"objective must be a regrow objective (regrow.Labels, regrow.Embedding, regrow.Custom); got "
            f"{type(objective).__name__}."
        )
    return objective


__all__ = [
    "Custom",
    "Embedding",
    "Labels",
    "Objective",
    "Scored",
    "as_scored",
    "check_objective",
    "objective_of",
    "shown",
]
