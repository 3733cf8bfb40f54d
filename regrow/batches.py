"""The one data contract regrow relies on: an iterable of ``(inputs, targets)`` batches.

``inputs`` is a tensor, or a dict of tensors passed to the model as keyword arguments (Hugging Face
style). ``targets`` is a 1-D tensor of class indices (int64, or uint8). DataLoaders and plain lists of
batches both qualify.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from regrow.errors import RegrowError

Batch = tuple[Any, Tensor]


def unpack(batch: Any) -> Batch:
    """Split a batch into ``(inputs, targets)``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    raise RegrowError(
        "each batch must be an (inputs, targets) pair, or a dict with a 'labels' entry; got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "") + "."
    )


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def forward(model: nn.Module, inputs: Any) -> Tensor:
    """Call the model on ``inputs`` and return its logits."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise RegrowError(
        f"the model returned {type(out).__name__}; regrow needs a logits tensor, an output with a "
        "'.logits' attribute, or a tuple whose first element is the logits."
    )


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, dict):
        return next(iter(inputs.values())).shape[0]
    raise RegrowError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}.")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_reiterable(data: Iterable[Any], name: str, reads: str = "once per epoch") -> None:
    """Refuse one-shot iterators: recovery reads the data once per epoch (``reads`` says how it is read)."""
    if iter(data) is data:
        raise RegrowError(
            f"'{name}' is a one-shot iterator, but it is read {reads}; pass something that can be iterated "
            "again, such as a torch DataLoader or a list of (inputs, targets) batches."
        )


def check_batch(model: nn.Module, data: Iterable[Any], name: str, *, label_range: bool = True) -> None:
    """Run one batch of ``data`` through ``model`` (eval mode, no gradients) before anything is trained.

    Labels must be a 1-D tensor of class indices (int64, or uint8 as raw image datasets store them), and with
    ``label_range`` within the model's outputs;
    the model must accept the inputs. A RegrowError names the split (``name``) and the problem.
    """
    batch = next(iter(data), None)
    if batch is None:
        raise RegrowError(f"the {name} data has no batches.")
    inputs, targets = unpack(batch)
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.dtype not in (torch.long, torch.uint8):
        got = (
            f"a {targets.dim()}-D {str(targets.dtype).removeprefix('torch.')} tensor"
            if isinstance(targets, Tensor)
            else type(targets).__name__
        )
        raise RegrowError(
            f"the labels of the {name} data must be a 1-D int64 (torch.long) or uint8 tensor of class indices, "
            f"one per sample; got {got}. Convert them in the data factory, e.g. y.long()."
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = forward(model, to_device(inputs, model_device(model)))
    except RegrowError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch between the data and the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RegrowError(
            f"the model cannot run on a batch of the {name} data ({type(exc).__name__}: {first}); check the "
            "inputs' shape and dtype against what the model expects."
        ) from None
    finally:
        model.train(was_training)
    if label_range and targets.numel():
        classes = logits.shape[-1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise RegrowError(
                f"the labels of the {name} data run from {low} to {high}, but the model scores {classes} classes "
                f"(labels 0 to {classes - 1})."
            )
