"""How the recovery loop computes: precision, memory format, compilation, data copies, metrics on the device.

None of this changes what is trained, only how fast; with the defaults (``precision="fp32"``, no compile,
channels-last only on CUDA) a CPU run computes exactly what it computed before these options existed.

* **precision** ``"bf16"`` / ``"fp16"``: the forward pass and the loss (the student's and the teacher's)
  and validation run under ``torch.autocast``. Weights, gradients and optimizer state stay float32, so
  the masks act on float32 gradients and weights exactly as in fp32: a pruned weight's gradient is
  multiplied by 0 and its weight never moves. ``"fp16"`` adds a gradient scaler (fp16's narrow range
  would flush small gradients to zero); the gradients are unscaled right after the backward pass, so
  callbacks, masks and clipping see true gradients, and a step whose gradients hold an inf or NaN is
  skipped whole (weights and optimizer state untouched; counted in ``details["compute"]``). Finding
  that out is a host sync per step, by ``GradScaler``'s design; bf16 needs no scaler and no sync.
* **channels_last** (``"auto"``: on for a convolutional model on a CUDA device, i.e. one with a Conv2d
  other than a ViT's patch embedding): the model's 4-D weights
  and 4-D inputs use the NHWC memory format, which cuDNN's fastest convolutions (tensor cores) want.
  Values are the same; the mask multipliers take each weight's layout so one fused multiply still
  covers every target. The model (and the teacher) are handed back in the layout they came in.
* **compile**: the student's training forward runs through ``torch.compile``; masks are applied outside
  the compiled graph, on the gradients and weights themselves, so they stay exact. Validation and the
  teacher run eagerly (a second graph for eval mode would double the compile time).
* **host syncs**: training loss and accuracy are summed on the device (``DeviceTally``) and read back
  once per progress-bar refresh and once per epoch.
* **copies**: on CUDA, each batch is copied from pinned memory with ``non_blocking=True`` on a side
  stream, one batch ahead, so the copy overlaps the previous step's compute.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import regrow.distributed as distributed
from regrow.batches import tensors, to_device, unpack
from regrow.errors import RegrowError
from regrow.objectives import Scored

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (no context at all for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def convolutional(model: nn.Module) -> bool:
    """Whether the model has a Conv2d other than a patch embedding (kernel size = stride > 1): a CNN, not a ViT."""
    return any(
        isinstance(m, nn.Conv2d) and (m.kernel_size != m.stride or max(m.kernel_size) == 1) for m in model.modules()
    )


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D tensors are in the channels-last layout already (a tensor with one channel or a
    1x1 kernel is both layouts at once; at least one must be channels-last only)."""
    four_d = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    return all(t.is_contiguous(memory_format=torch.channels_last) for t in four_d) and any(
        not t.is_contiguous() for t in four_d
    )


def check_precision(precision: str, model: nn.Module, device: torch.device) -> None:
    """Refuse a precision that ``model`` on ``device`` cannot train in."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RegrowError("precision 'bf16' needs a GPU with bfloat16 support (Ampere or newer); use 'fp16'.")
    if precision == "fp16" and any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        raise RegrowError(
            "precision 'fp16' is mixed precision: float32 weights, fp16 compute, a loss scaler; this model's "
            "weights are float16 already, which the scaler cannot update. Use precision 'fp32' (the model then "
            "computes in its own dtype) or load it in float32."
        )


@dataclass
class Compute:
    """The settled compute options of one recovery run, and what they did (``details``)."""

    precision: str
    device: torch.device
    channels_last: bool
    compile: bool
    weights: str  # the dtype of the trained weights, e.g. "float32"
    scaler: torch.amp.GradScaler | None = None
    skipped_steps: int = 0
    _scale: float = 0.0
    _converted: list[nn.Module] = field(default_factory=list)

    @classmethod
    def settle(cls, options: Any, model: nn.Module, device: torch.device) -> Compute:
        """Resolve ``options.precision`` / ``channels_last`` / ``compile`` for ``model`` on ``device``."""
        precision = options.precision
        check_precision(precision, model, device)
        wanted = options.channels_last
        channels_last = (device.type == "cuda" and convolutional(model)) if wanted == "auto" else bool(wanted)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        dtypes = [p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        weights = str(dtypes[0] if dtypes else torch.float32).removeprefix("torch.")
        settled = cls(precision, device, channels_last, bool(options.compile), weights, scaler)
        settled._scale = scaler.get_scale() if scaler is not None else 0.0
        return settled

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.precision, self.device)

    def prepare(self, model: nn.Module, teacher: nn.Module | None) -> nn.Module:
        """Put the model (and the teacher) in the chosen layout; the module the training steps call."""
        if self.channels_last:
            for m in (model, teacher):
                if m is not None and not _is_channels_last(m):
                    m.to(memory_format=torch.channels_last)
                    self._converted.append(m)
        trained = distributed.wrap(model)  # several processes: DistributedDataParallel (the teacher never is)
        return torch.compile(trained) if self.compile else trained  # type: ignore[return-value]

    def restore(self) -> None:
        """Hand the models back in the layout they came in."""
        for m in self._converted:
            m.to(memory_format=torch.contiguous_format)
        self._converted.clear()

    def layout(self, inputs: Any) -> Any:
        """Image batches in the model's memory format (a no-op without channels-last)."""
        if self.channels_last and isinstance(inputs, Tensor) and inputs.dim() == 4 and inputs.is_floating_point():
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def backward(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass; with a scaler, of the scaled loss, then the gradients unscaled in place."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # callbacks, masks and clipping see the true gradients

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; with a scaler, skipped when the gradients hold an inf or NaN."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
        scale = self.scaler.get_scale()  # the scale only falls after a skipped step
        if scale < self._scale:
            self.skipped_steps += 1
        self._scale = scale

    def details(self) -> dict[str, Any]:
        """What the result and the report say about how recovery computed."""
        out: dict[str, Any] = {
            "precision": self.precision,
            "weights": self.weights,
            "device": self.device.type,
            "channels_last": self.channels_last,
            "compile": self.compile,
        }
        if self.scaler is not None:
            out["skipped_steps"] = self.skipped_steps
        if distributed.active():
            out["processes"] = distributed.world()  # DistributedDataParallel, each batch split across them
        return out


def _pinned(x: Any) -> Any:
    """CPU tensors in page-locked memory, so that their copy to the GPU runs asynchronously."""
    if isinstance(x, Tensor):
        return x.pin_memory() if x.device.type == "cpu" and not x.is_pinned() else x
    if isinstance(x, dict):
        return {k: _pinned(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_pinned(v) for v in x)
    return x


def on_device(batches: Iterable[Any], device: torch.device) -> Iterator[tuple[Any, Any]]:
    """``(inputs, targets)`` of each batch on ``device``; on CUDA copied one batch ahead on a side stream.

    The copy of batch i + 1 is queued before batch i is handed out, so it overlaps batch i's step; the
    compute stream waits for it before use, and the tensors are recorded on the compute stream so their
    memory is not reused while a step still reads it.
    """
    if device.type != "cuda":
        for batch in batches:
            inputs, targets = unpack(batch)
            yield to_device(inputs, device), to_device(targets, device)
        return
    stream = torch.cuda.Stream(device)
    pending: tuple[Any, Any] | None = None
    for batch in batches:
        inputs, targets = unpack(batch)
        with torch.cuda.stream(stream):
            copied = to_device(_pinned(inputs), device), to_device(_pinned(targets), device)
        if pending is not None:
            yield _arrived(pending, stream)
        pending = copied
    if pending is not None:
        yield _arrived(pending, stream)


def _arrived(batch: tuple[Any, Any], stream: torch.cuda.Stream) -> tuple[Any, Any]:
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for t in tensors(batch):
        t.record_stream(current)
    return batch


class DeviceTally:
    """Training loss and accuracy of one epoch, summed on the device; ``read`` is the only host sync.

    A batch counts its scored units (samples, or real tokens: ``regrow.tasks``). Each named loss is summed as
    ``loss * units`` in float64 (float32 on MPS, which has no float64): a float32 loss times an integer count
    is exact in float64, so the sums round exactly as Python float sums of the same values in the same order
    would.
    """

    def __init__(self) -> None:
        self.seen = 0  # samples (batch rows), known on the host
        self._groups: dict[tuple[str, ...], Tensor] = {}  # loss names -> their sums (usually one group)
        self._correct: Tensor | None = None
        self._units: Tensor | None = None
        self._read: tuple[dict[str, float], float, int] | None = ({}, 0, 0)
        self._last_show = time.monotonic()

    def add(self, losses: dict[str, Tensor], scored: Scored) -> None:
        """Count one batch (no host sync): its named losses and its metric (``regrow.objectives.Scored``)."""
        values = torch.stack([v.detach().reshape(()) for v in losses.values()])
        dtype = torch.float32 if values.device.type == "mps" else torch.float64
        values = values.to(dtype)
        n = scored.units.to(values.device, dtype)
        right = scored.score.detach().to(values.device, dtype)
        names = tuple(losses)
        if names in self._groups:
            self._groups[names].add_(values * n)
        else:
            self._groups[names] = values * n
        self._correct = right if self._correct is None else self._correct.add_(right)
        self._units = n if self._units is None else self._units.add_(n)
        self.seen += int(scored.outputs.shape[0])
        self._read = None

    def read(self) -> tuple[dict[str, float], float, int]:
        """(sum of each named loss weighted by units, the metric's sum (correct units, for accuracy), units), read
        back from the device."""
        if self._read is None:
            assert self._correct is not None and self._units is not None
            groups = list(self._groups.items())
            dtype = groups[0][1].dtype
            tail = [self._correct.to(dtype).reshape(1), self._units.to(dtype).reshape(1)]
            flat = torch.cat([s for _, s in groups] + tail).tolist()
            sums: dict[str, float] = {}
            i = 0
            for names, _ in groups:
                for name in names:
                    sums[name] = sums.get(name, 0.0) + flat[i]
                    i += 1
            self._read = sums, flat[-2], round(flat[-1])
        return self._read

    def state(self) -> dict[str, Any]:
        """The sums so far, for a mid-epoch checkpoint."""
        groups = [(list(k), v) for k, v in self._groups.items()]
        return {"seen": self.seen, "groups": groups, "correct": self._correct, "units": self._units}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        """Continue from the sums of :meth:`state` (moved to ``device``)."""
        self.seen = state["seen"]
        self._groups = {tuple(k): v.to(device) for k, v in state["groups"]}
        self._correct = state["correct"].to(device) if state["correct"] is not None else None
        self._units = state["units"].to(device) if state["units"] is not None else None
        self._read = None if self.seen else ({}, 0, 0)

    def show(self, bar: Any) -> None:
        """Put the running mean loss on the progress bar, at most once per bar refresh interval."""
        now = time.monotonic()
        if bar.disable or not self.seen or now - self._last_show < bar.mininterval:
            return
        self._last_show = now
        sums, _, units = self.read()
        bar.set_postfix(loss=f"{sums['loss'] / max(units, 1):.4f}", refresh=False)
