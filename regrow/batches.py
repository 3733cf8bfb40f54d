"""The one data contract regrow relies on: an iterable of ``(inputs, targets)`` batches.

``inputs`` is a tensor, or a dict of tensors passed to the model as keyword arguments (Hugging Face
style). ``targets`` is a 1-D tensor of class indices (int64, or uint8), or for a language model a 2-D int64
tensor of the next token at each position (-100 where nothing is scored; ``regrow.tasks``). DataLoaders and
plain lists of batches both qualify.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from regrow.errors import RegrowError
from regrow.tasks import IGNORE, unit

Batch = tuple[Any, Tensor]


def unpack(batch: Any) -> Batch:
    """Split a batch into ``(inputs, targets)``; a dict batch without ``labels`` has targets None."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):  # Hugging Face style; without 'labels' (an unlabeled encoder) the targets are None
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    raise RegrowError(
        "each batch must be an (inputs, targets) pair, or a dict of model inputs (with a 'labels' entry when the "
        "objective needs labels); got "
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


def call(model: nn.Module, inputs: Any) -> Any:
    """Call the model on ``inputs`` (a mapping as keyword arguments) and return what it returns."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def forward(model: nn.Module, inputs: Any) -> Tensor:
    """Call the model on ``inputs`` and return its logits (or, for a model without them, its first output)."""
    return output_tensor(call(model, inputs))


def output_tensor(out: Any) -> Tensor:
    """The tensor regrow reads from what a model returned: itself, its ``.logits``, a tuple's first element, or a
    mapping's first tensor."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, Mapping):  # e.g. a Hugging Face encoder's output: its first tensor, last_hidden_state
        first = next((v for v in out.values() if isinstance(v, Tensor)), None)
        if first is not None:
            return first
    raise RegrowError(
        f"the model returned {type(out).__name__}; regrow needs a logits tensor, an output with a "
        "'.logits' attribute, a tuple whose first element is the logits, or a mapping whose first tensor is "
        "the output (a Hugging Face model's last_hidden_state)."
    )


def tensors(x: Any) -> Iterator[Tensor]:
    """Every tensor in ``x``: itself, or nested in tuples, lists and dicts (a Hugging Face output is one)."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)


def all_outputs(model: nn.Module, inputs: Any) -> list[Tensor]:
    """Call the model on ``inputs`` and return every tensor it returned that autograd records, the one
    :func:`forward` reads first: tracing from all of them finds every layer that reads a group's channels, a BERT
    pooler beside the hidden states included."""
    out = call(model, inputs)
    first = output_tensor(out)
    return [first, *(t for t in tensors(out) if t is not first and t.grad_fn is not None)]


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


def check_batch(model: nn.Module, data: Iterable[Any], name: str, *, label_range: bool = True) -> int:
    """Run one batch of ``data`` through ``model`` (eval mode, no gradients) before anything is trained; the
    number of classes the model scores (its logits' last dimension).

    Labels must be a 1-D tensor of class indices (int64, or uint8 as raw image datasets store them), and with
    ``label_range`` within the model's outputs;
    the model must accept the inputs. A RegrowError names the split (``name``) and the problem.
    """
    batch = next(iter(data), None)
    if batch is None:
        raise RegrowError(f"the {name} data has no batches.")
    inputs, targets = unpack(batch)
    if targets is None:
        raise RegrowError(
            f"the {name} data has no labels (dict batches without a 'labels' entry). An encoder without labels is "
            "recovered by its embeddings: recover.objective.kind: embedding in a recipe, objective=regrow.Embedding() "
            "in Python."
        )
    got = _label_kind(targets)
    if got is not None:
        raise RegrowError(
            f"the labels of the {name} data must be a 1-D int64 (torch.long) or uint8 tensor of class indices, "
            f"one per sample, or a 2-D int64 tensor of token indices, one per position; got {got}. Convert them "
            "in the data factory, e.g. y.long()."
        )
    _check_shifted(inputs, targets, f"the {name} data")
    logits = _run_once(
        model,
        inputs,
        lambda failure: (
            f"the model cannot run on a batch of the {name} data ({failure}); check the inputs' shape "
            "and dtype against what the model expects."
        ),
    )
    try:
        unit(logits, targets)
    except RegrowError as exc:
        raise RegrowError(f"on the {name} data, {exc}") from None
    classes = logits.shape[-1]
    real = targets[targets != IGNORE] if targets.dim() == 2 else targets
    if label_range and real.numel():
        low, high = int(real.min()), int(real.max())
        if low < 0 or high >= classes:
            raise RegrowError(
                f"the labels of the {name} data run from {low} to {high}, but the model scores {classes} classes "
                f"(labels 0 to {classes - 1})."
            )
    return classes


MAX_SHAPE_RUNS = 8  # per split, the model runs on at most this many input shapes beyond the first batch's


def _layout(x: Any) -> Any:
    """The kind, dtype and number of dimensions of each input tensor (a tensor, or a dict / list / tuple)."""
    if isinstance(x, Tensor):
        return (str(x.dtype).removeprefix("torch."), x.dim())
    if isinstance(x, dict):
        return {k: _layout(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_layout(v) for v in x]
    return type(x).__name__


def _shapes(x: Any) -> Any:
    """The sizes of each input tensor beyond the batch dimension, as a hashable value."""
    if isinstance(x, Tensor):
        return tuple(x.shape[1:])
    if isinstance(x, dict):
        return tuple((k, _shapes(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return tuple(_shapes(v) for v in x)
    return None


def _non_finite(x: Any, key: str = "inputs") -> str | None:
    """Where ``x`` holds NaN or inf, counted (None when every floating-point value is finite)."""
    if isinstance(x, Tensor):
        if not (x.is_floating_point() or x.is_complex()) or bool(torch.isfinite(x).all()):
            return None
        return f"{int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} inf values in {key}"
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
    found = [_non_finite(v, f"{key}[{k!r}]") for k, v in items]
    return "; ".join(f for f in found if f) or None


def _count(inputs: Any) -> int | None:
    """The number of samples in a batch's inputs, when they say it unambiguously."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.dim() else None
    if isinstance(inputs, dict):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim()}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def _label_kind(targets: Any) -> str | None:
    """None for labels regrow scores (1-D int64 / uint8 class indices, 2-D int64 token indices), else what they are."""
    if isinstance(targets, Tensor) and (
        (targets.dim() == 1 and targets.dtype in (torch.long, torch.uint8))
        or (targets.dim() == 2 and targets.dtype == torch.long)
    ):
        return None
    if isinstance(targets, Tensor):
        return f"a {targets.dim()}-D {str(targets.dtype).removeprefix('torch.')} tensor"
    return type(targets).__name__


def _check_shifted(inputs: Any, targets: Tensor, where: str) -> None:
    """Token targets equal to the input ids would teach a language model to copy its input: refuse them."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs if targets.dim() == 2 else None
    if not (isinstance(ids, Tensor) and ids.shape == targets.shape and targets.dim() == 2):
        return
    real = targets != IGNORE  # padding marked -100 in the labels does not hide a copy of the inputs
    if bool(real.any()) and torch.equal(ids[real], targets[real]):
        raise RegrowError(
            f"{where} has token targets equal to its input ids. regrow scores logits[:, t] against targets[:, t], "
            "so for a language model the targets are the inputs shifted left by one (the next token; -100 at "
            "the end), not Hugging Face's unshifted labels; build them with regrow.data.text.next_token_batches "
            "or shift them in the data factory."
        )


def _check_labels(targets: Any, inputs: Any, where: str, classes: int | None) -> None:
    """One batch's labels: class indices (one per sample) or token indices (one per position), within the
    model's ``classes`` outputs; -100 marks token positions that are not scored."""
    got = _label_kind(targets)
    if got is not None:
        raise RegrowError(
            f"{where} has labels of {got}; labels must be a 1-D int64 or uint8 tensor of class indices, or a 2-D "
            "int64 tensor of token indices."
        )
    _check_shifted(inputs, targets, where)
    samples = _count(inputs)
    if samples is not None and samples != targets.shape[0]:
        raise RegrowError(f"{where} has {samples} inputs but {targets.shape[0]} labels; one label per input.")
    real = targets[targets != IGNORE] if targets.dim() == 2 else targets
    if classes is not None and real.numel():
        low, high = int(real.min()), int(real.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise RegrowError(
                f"{where} has a label {bad} outside the model's {classes} outputs (labels 0 to {classes - 1})."
            )


def check_batches(model: nn.Module, data: Iterable[Any], name: str, *, classes: int | None) -> None:
    """Check every batch of ``data`` once, before anything is trained or written (after :func:`check_batch`).

    Each batch: labels as :func:`check_batch` wants them, one per input and (with ``classes``) within the model's
    outputs; inputs of the first batch's kind, dtypes and number of dimensions, every floating-point value
    finite; a batch with input sizes not seen before is run through the model (eval mode, no gradients; at most
    ``MAX_SHAPE_RUNS`` new shapes per split). The pass reads the data once and computes little: labels' min and
    max, ``isfinite`` over the inputs. A RegrowError names the split and the batch index in one line.
    """
    first: Any = None
    seen: set[Any] = set()
    for index, batch in enumerate(data):
        where = f"batch {index} of the {name} data (counting from 0)"
        try:
            inputs, targets = unpack(batch)
        except RegrowError as exc:
            raise RegrowError(f"{where}: {exc}") from None
        _check_labels(targets, inputs, where, classes)
        layout = _layout(inputs)
        if first is None:
            first = layout
        elif layout != first:
            raise RegrowError(f"{where} has inputs {layout}, unlike batch 0's {first} (dtype, number of dimensions).")
        bad = _non_finite(inputs)
        if bad is not None:
            raise RegrowError(f"{where} has {bad}; regrow cannot train or measure on them: fix the data.")
        shapes = _shapes(inputs)
        if index and shapes not in seen and len(seen) <= MAX_SHAPE_RUNS:
            _run_once(
                model,
                inputs,
                lambda failure, where=where: (
                    f"the model cannot run on {where} ({failure}), whose input sizes differ from the "
                    "earlier batches'; check the inputs' shapes."
                ),
            )
        seen.add(shapes)


def _run_once(model: nn.Module, inputs: Any, explain: Callable[[str], str]) -> Tensor:
    """The model's output on ``inputs`` (eval mode, no gradients); a failure is a RegrowError whose message is
    ``explain("<exception type>: <first line>")``: any failure here is a mismatch between data and model."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return forward(model, to_device(inputs, model_device(model)))
    except RegrowError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RegrowError(explain(f"{type(exc).__name__}: {first}")) from None
    finally:
        model.train(was_training)
