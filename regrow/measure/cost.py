"""Static costs: parameters, nonzeros, dense MACs (torch.utils.flop_counter) and bytes on disk."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from regrow.batches import forward


def storage_key(t: Tensor) -> tuple[int, int, tuple[int, ...]]:
    """Equal for two names of one tied tensor: where its data starts, and its shape."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def unique_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with tied tensors kept once (what ``safetensors.torch.save_model`` writes)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) over the model's parameters, tied parameters counted once."""
    total = nonzero = 0
    for p in model.parameters():  # parameters() already yields a tied parameter once
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def dense_macs(model: nn.Module, inputs: Any) -> int | None:
    """Multiply-accumulates of one forward pass over ``inputs``, counted as if every weight were dense.

    Uses ``torch.utils.flop_counter`` (which counts 2 FLOPs per MAC for matmuls and convolutions).
    Returns None, with a warning, when the model runs an operation the counter cannot follow.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward(model, inputs)
    except Exception as exc:  # noqa: BLE001 - MACs are informative; never fail a run over them
        warnings.warn(f"could not count MACs ({type(exc).__name__}: {exc}); reporting none.", stacklevel=2)
        return None
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def size_bytes(model: nn.Module) -> int:
    """Size of the model's weights saved as one safetensors file (dense storage, zeros included)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in unique_tensors(model).items()}
    return len(safetensors_bytes(tensors))


def sparse_size_bytes(model: nn.Module, targets: list[str]) -> int:
    """Estimated size if each target were stored as a bitmask plus its nonzero values.

    Non-target tensors are counted dense. This is what a simple sparse format costs; the report labels it
    as an estimate because regrow itself saves dense safetensors.
    """
    tensors = unique_tensors(model)
    total = 0
    for name, t in tensors.items():
        if name in targets:
            nnz = int(torch.count_nonzero(t))
            total += nnz * t.element_size() + (t.numel() + 7) // 8
        else:
            total += t.numel() * t.element_size()
    return total
