"""``regrow.evaluate``: the measured state of a model at one stage (a :class:`Snapshot`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from regrow.batches import check_reiterable, model_device, to_device, unpack
from regrow.errors import RegrowError
from regrow.masks import MaskSet, measured_sparsity
from regrow.measure.cost import count_params, dense_macs, size_bytes, sparse_size_bytes
from regrow.measure.latency import Latency, measure_latency
from regrow.measure.metrics import classification_metrics
from regrow.objectives import Objective, check_objective
from regrow.select import default_targets


@dataclass
class Snapshot:
    """What a model is and does at one stage of a run.

    ``macs`` are dense multiply-accumulates for one sample: zeros inside dense tensors still cost MACs.
    ``accuracy`` holds the objective's metric, which ``metric`` names (accuracy by default; e.g. the cosine
    similarity to the dense model for ``regrow.Embedding``).
    ``latency`` is measured on the CPU; ``latency_gpu`` too when a CUDA device is present.
    ``size_bytes`` is the dense safetensors size; ``sparse_size_bytes`` estimates a bitmask + nonzero
    values encoding of the targets.
    """

    stage: str
    accuracy: float
    loss: float
    samples: int
    params: int
    nonzero_params: int
    target_sparsity: float
    per_target_sparsity: dict[str, float]
    macs: int | None
    latency: Latency | None
    size_bytes: int
    sparse_size_bytes: int
    latency_gpu: Latency | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None  # language models: exp of the mean token loss (accuracy is per token)
    metric: str = "accuracy"  # what ``accuracy`` holds: the objective's metric (regrow.objectives)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["latency"] = self.latency.to_dict() if self.latency else None
        out["latency_gpu"] = self.latency_gpu.to_dict() if self.latency_gpu else None
        return out


def _slice(inputs: Any, n: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[:n]
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    raise RegrowError(f"cannot slice inputs of type {type(inputs).__name__}.")


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sample_inputs(data: Iterable[Any], n: int | None) -> Any:
    """The first ``n`` inputs of ``data`` (all of the first batch when ``n`` is None)."""
    parts, have = [], 0
    for batch in data:
        inputs, _ = unpack(batch)
        parts.append(inputs)
        have += inputs.shape[0] if isinstance(inputs, Tensor) else next(iter(inputs.values())).shape[0]
        if n is None or have >= n:
            break
    if not parts:
        raise RegrowError("the evaluation data is empty; it needs at least one batch.")
    if n is None:
        return parts[0]
    while have < n:  # fewer samples than the requested latency batch: repeat them
        parts = parts + parts
        have *= 2
    return _slice(_cat(parts), n)


def _latency_on(model: nn.Module, inputs: Any, device: torch.device, repeats: int, warmup: int) -> Latency:
    """Latency on ``device``, on a copy when the model lives elsewhere."""
    if model_device(model).type != device.type:
        model = copy.deepcopy(model).to(device)
    return measure_latency(model, to_device(inputs, device), repeats=repeats, warmup=warmup)


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    masks: MaskSet | None = None,
    targets: list[str] | None = None,
    stage: str = "",
    latency: bool = True,
    latency_batch_size: int | None = None,
    repeats: int = 20,
    warmup: int = 5,
    progress: bool = False,
    objective: Objective | None = None,
) -> Snapshot:
    """Measure ``model`` on ``data``.

    Args:
        data: iterable of ``(inputs, targets)`` batches (use a held-out test split for claims).
        masks / targets: which parameters count as targets for the sparsity figures; default: the
            default targets of :func:`regrow.select.default_targets`.
        latency: measure forward latency (set False to skip it).
        latency_batch_size: batch size for latency; default: the size of the first batch.
        repeats / warmup: timed and untimed forward passes for the latency median.
        stage: a name for this measurement (e.g. "pruned"), kept in the snapshot and shown on its progress bar.
        progress: show a progress bar over ``data``.
        objective: what is scored (``regrow.objectives``): default labels (accuracy); ``regrow.Embedding(
            teacher=dense)`` for an encoder without labels (cosine similarity to the dense model's embeddings);
            ``regrow.Custom(loss, metric_fn)`` for the user's own.

    Returns:
        A :class:`Snapshot` with accuracy and loss (per sample; for a language model per token, with its
        perplexity), total and nonzero parameters, per-target sparsity read from the weights, dense MACs per
        sample, latency and saved size.
    """
    check_reiterable(data, "data", "twice (for the metrics, then one batch to count MACs and time)")
    fqns = list(masks) if masks is not None else (targets if targets is not None else default_targets(model))
    objective = check_objective(objective)
    metrics = classification_metrics(
        model, data, objective=objective, progress=progress, desc=f"evaluate {stage}".strip()
    )
    total, nonzero = count_params(model)
    per_target = measured_sparsity(model, fqns)
    numels = {f: model.get_parameter(f).numel() for f in fqns}
    zeros = sum(per_target[f] * numels[f] for f in fqns)
    device = model_device(model)
    one = to_device(sample_inputs(data, 1), device)
    lat = lat_gpu = None
    if latency:
        batch = sample_inputs(data, latency_batch_size)
        lat = _latency_on(model, batch, torch.device("cpu"), repeats, warmup)
        if torch.cuda.is_available():
            lat_gpu = _latency_on(model, batch, torch.device("cuda"), repeats, warmup)
    return Snapshot(
        stage=stage,
        accuracy=metrics["accuracy"],
        loss=metrics["loss"],
        samples=int(metrics["samples"]),
        params=total,
        nonzero_params=nonzero,
        target_sparsity=zeros / sum(numels.values()) if numels else 0.0,
        per_target_sparsity=per_target,
        macs=dense_macs(model, one),
        latency=lat,
        latency_gpu=lat_gpu,
        size_bytes=size_bytes(model),
        sparse_size_bytes=sparse_size_bytes(model, fqns),
        perplexity=metrics.get("perplexity"),
        metric=objective.metric,
    )


__all__ = ["Latency", "Snapshot", "evaluate", "measure_latency", "classification_metrics"]
