"""MaskSet: boolean keep-masks addressed by fully-qualified parameter name.

``True`` means keep. Masks are enforced by multiplying weights after every optimizer step and gradients
before it, never with forward hooks: the model keeps its own ``state_dict`` keys, deep-copies cleanly and
runs at dense speed (see DESIGN.md, "Traps we avoid").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from regrow.errors import RegrowError
from regrow.io import atomic_write
from regrow.spec import PruneSpec

if TYPE_CHECKING:
    from regrow.structural.report import StructureReport


@dataclass
class MaskSet(Mapping[str, Tensor]):
    """Keep-masks for the pruning targets of one model.

    Attributes:
        masks: fqn -> bool tensor of the parameter's shape (True = keep).
        spec: how the masks were made; schedules use it to prune further with the same settings.
        dense: a frozen copy of the model taken just before pruning (the default distillation teacher).
            It is not saved with the masks.
        structure: for structural patterns, what was removed (the model is shrunk; there are no masks).
    """

    masks: dict[str, Tensor]
    spec: PruneSpec | None = None
    dense: nn.Module | None = field(default=None, repr=False, compare=False)
    structure: StructureReport | None = field(default=None, repr=False, compare=False)
    version: int = field(default=0, repr=False, compare=False)

    def touch(self) -> None:
        """Record that masks were changed in place (so cached multipliers are rebuilt)."""
        self.version += 1

    # Mapping interface -------------------------------------------------------------------------
    def __getitem__(self, fqn: str) -> Tensor:
        return self.masks[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    # Statistics --------------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of zeros over all targets together."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(torch.count_nonzero(m)) for m in self.masks.values())  # no int64 copy
        return 1.0 - kept / total if total else 0.0

    def per_target(self) -> dict[str, float]:
        """Sparsity of each target according to its mask."""
        return {f: 1.0 - int(torch.count_nonzero(m)) / m.numel() for f, m in self.masks.items()}

    # Enforcement -------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
        """Pair each mask with its parameter (mask moved to the parameter's device).

        Raises:
            RegrowError: a mask names a parameter the model lacks, or the shapes differ.
        """
        pairs = []
        for fqn, mask in self.masks.items():
            try:
                param = model.get_parameter(fqn)
            except AttributeError:
                raise RegrowError(
                    f"mask {fqn!r} names no parameter of the model; the masks were made for another "
                    "model or the model was changed after pruning."
                ) from None
            if type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor":
                raise RegrowError(
                    f"parameter {fqn!r} is a DTensor (sharded by FSDP2's fully_shard or by tensor parallelism); "
                    "regrow's masks are whole tensors on one device. Prune, recover and save the model before it "
                    "is sharded, with DistributedDataParallel (torchrun) when it fits one device; docs/scale.md "
                    "says what FSDP2 needs."
                )
            if param.shape != mask.shape:
                raise RegrowError(
                    f"mask {fqn!r} has shape {tuple(mask.shape)} but the parameter has shape "
                    f"{tuple(param.shape)}; the masks were made for another model."
                )
            if mask.device != param.device:
                mask = mask.to(param.device)
                self.masks[fqn] = mask
            pairs.append((param, mask))
        return pairs

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked weight of ``model`` in place (filled, not multiplied: no float copy of the mask)."""
        for param, mask in self.bind(model):
            param.masked_fill_(mask.logical_not(), 0)

    @torch.no_grad()
    def clear_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer state (momentum, Adam moments, ...) of masked weights.

        Needed whenever masks change during training, so that a newly pruned weight carries no
        velocity and a regrown one starts from a clean state.
        """
        for param, mask in self.bind(model):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == mask.shape:
                    value.mul_(mask)

    # Persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the masks to a safetensors file (atomically), one bit per weight, with their shapes and the spec as
        metadata."""
        tensors = {f: pack(m) for f, m in self.masks.items()}
        shapes = {f: list(m.shape) for f, m in self.masks.items()}
        meta = {"format": "regrow.masks", "version": "2", "shapes": json.dumps(shapes)}
        if self.spec is not None:
            meta["spec"] = json.dumps(self.spec.to_dict())
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskSet:
        """Read masks written by :meth:`save`."""
        try:
            tensors = load_file(os.fspath(path))
        except FileNotFoundError:
            raise RegrowError(f"mask file {os.fspath(path)!r} does not exist.") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise RegrowError(f"mask file {os.fspath(path)!r} is not a readable safetensors file ({exc}).") from None
        shapes = _metadata(path).get("shapes")
        if shapes is not None:  # version 2: bit-packed
            try:
                return cls(masks=unpacked(tensors, json.loads(shapes)), spec=_saved_spec(path))
            except (ValueError, KeyError, TypeError) as exc:
                raise RegrowError(f"mask file {os.fspath(path)!r} has unreadable packed masks ({exc}).") from None
        bad = [f for f, t in tensors.items() if t.dtype != torch.bool]  # version 1: one bool per weight
        if bad:
            raise RegrowError(f"mask file {os.fspath(path)!r} holds non-boolean tensors: {bad}.")
        return cls(masks=dict(tensors), spec=_saved_spec(path))


def pack(mask: Tensor) -> Tensor:
    """A keep-mask as bits (uint8, 8 weights a byte, row-major), on the CPU."""
    import numpy as np

    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).reshape(-1).numpy()))


def unpacked(packed: Mapping[str, Tensor], shapes: Mapping[str, list[int]]) -> dict[str, Tensor]:
    """The masks :func:`pack` made, in their ``shapes`` (every name in ``shapes`` must be in ``packed``)."""
    import numpy as np

    out = {}
    for fqn, shape in shapes.items():
        bits = packed[fqn]
        count = int(np.prod(shape))
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (count + 7) // 8:
            raise ValueError(f"{fqn!r} holds {tuple(bits.shape)} {bits.dtype}, not the bits of shape {shape}")
        out[fqn] = torch.from_numpy(np.unpackbits(bits.numpy(), count=count).astype(bool)).reshape(shape)
    return out


def _metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _saved_spec(path: str | os.PathLike[str]) -> PruneSpec | None:
    """The PruneSpec :meth:`MaskSet.save` stored in the file's metadata (None for files without one), so that
    checks that depend on the pattern (e.g. dynamic sparsity needs unstructured masks) still apply."""
    text = _metadata(path).get("spec")
    if text is None:
        return None
    try:
        return PruneSpec(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise RegrowError(f"mask file {os.fspath(path)!r} has an unreadable spec in its metadata ({exc}).") from None


class MaskEnforcer:
    """Multiplies gradients and weights by the masks, as fast as the hot loop needs.

    The boolean masks are turned once into multipliers of each parameter's dtype and memory layout
    (multiplying by a bool tensor would convert it on every call; a channels-last weight times a contiguous
    multiplier would leave the fused kernel's fast path), and all targets are multiplied in one fused call.
    When the masks change in place (``MaskSet.touch``), the multipliers are rebuilt.
    """

    def __init__(self, masks: MaskSet, model: nn.Module) -> None:
        self.masks, self.model = masks, model
        self._version = -1
        self._params: list[Tensor] = []
        self._factors: list[Tensor] = []

    def _refresh(self) -> None:
        if self._version != self.masks.version:
            pairs = self.masks.bind(self.model)
            self._params = [p for p, _ in pairs]
            self._factors = [torch.empty_like(p, requires_grad=False).copy_(m) for p, m in pairs]
            self._version = self.masks.version

    @torch.no_grad()
    def gradients(self) -> None:
        self._refresh()
        grads = [p.grad for p in self._params if p.grad is not None]
        if len(grads) == len(self._params) and grads:
            torch._foreach_mul_(grads, self._factors)
        else:
            for p, f in zip(self._params, self._factors, strict=True):
                if p.grad is not None:
                    p.grad.mul_(f)

    @torch.no_grad()
    def weights(self) -> None:
        self._refresh()
        if self._params:
            torch._foreach_mul_(self._params, self._factors)


def measured_sparsity(model: nn.Module, fqns: list[str]) -> dict[str, float]:
    """Fraction of exact zeros in each named parameter, read from the weights themselves."""
    out = {}
    for fqn in fqns:
        p = model.get_parameter(fqn)
        out[fqn] = 1.0 - int(torch.count_nonzero(p)) / p.numel()
    return out
