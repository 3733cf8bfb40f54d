"""Static costs: parameters, nonzeros, dense MACs (torch.utils.flop_counter) and bytes on disk."""

from __future__ import annotations

import math
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


_SDPA_OPS = (  # scaled-dot-product attention's forward kernels; q, k, v are their first three arguments
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _sdpa_macs2(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs (2 a MAC) of attention over (batch, heads, tokens, dim) shapes: scores and weighted sum, each query
    head against its key/value head (grouped-query attention: fewer key/value heads, shared)."""
    *batch, heads, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * heads * queries * keys * (dim + value_dim)


def _counts_grouped_query_attention(count: Any) -> bool:
    try:
        count((1, 4, 2, 8), (1, 2, 2, 8), (1, 2, 2, 8))
    except Exception:  # noqa: BLE001 - torch before 2.13 asserts that q, k and v have as many heads
        return False
    return True


def _extra_formulas() -> dict[Any, Any]:
    """FLOP formulas the counter lacks: scaled-dot-product attention's CPU kernel (counted like its GPU ones),
    and, where torch's formula refuses key/value heads fewer than the query's (before torch 2.13), every
    attention kernel counted so that grouped-query attention (Llama, Qwen, Mistral) counts instead of failing."""
    from torch.utils import flop_counter

    count = getattr(flop_counter, "sdpa_flop_count", None)
    ops = [op for name in _SDPA_OPS if (op := getattr(torch.ops.aten, name, None)) is not None]
    if count is None or not _counts_grouped_query_attention(count):
        return dict.fromkeys(ops, _sdpa_macs2)
    return {op: _sdpa_macs2 for op in ops if op not in flop_counter.flop_registry}  # keyed by overload packet


def _count(model: nn.Module, inputs: Any, grad: bool) -> FlopCounterMode | None:
    """One counted forward pass. Without ``grad`` it returns None where the counter's module tracker fails on a
    view that a module takes as input: made under ``no_grad`` from a parameter (CaiT's class token, expanded), it
    requires grad but has no gradient function, and the tracker asserts it has one. With ``grad`` the pass
    records its autograd graph (memory for one pass's activations) and every such view has its function."""
    try:
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
            forward(model, inputs)
    except AssertionError as exc:
        if grad or "Expected gradient function to be set" not in str(exc):
            raise
        return None
    return counter


def dense_macs(model: nn.Module, inputs: Any, within: str | None = None) -> int | None:
    """Multiply-accumulates of one forward pass over ``inputs``, counted as if every weight were dense; with
    ``within`` (a submodule's name) only those computed inside that submodule.

    Uses ``torch.utils.flop_counter`` (which counts 2 FLOPs per MAC for matmuls and convolutions).
    Returns None, with a warning, when the model runs an operation the counter cannot follow.
    """
    was_training = model.training
    model.eval()
    # nn.MultiheadAttention's fused inference path runs as one kernel the counter cannot see into; the
    # unfused path computes the same projections and attention as counted matmuls.
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        counter = _count(model, inputs, grad=False)
        if counter is None:
            counter = _count(model, inputs, grad=True)
    except Exception as exc:  # noqa: BLE001 - MACs are informative; never fail a run over them
        warnings.warn(f"could not count MACs ({type(exc).__name__}: {exc}); reporting none.", stacklevel=2)
        return None
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    if within is None:
        return counter.get_total_flops() // 2
    return _inside(counter.get_flop_counts(), f"{type(model).__name__}.{within}") // 2


def _inside(counts: dict[str, dict[Any, int]], key: str) -> int:
    """FLOPs counted inside the module ``key``; a container that is never called itself (a ModuleList) has no
    entry of its own: the sum over its outermost called descendants."""
    if key in counts:
        return sum(counts[key].values())
    below = [k for k in counts if k.startswith(f"{key}.")]
    outermost = [k for k in below if not any(k.startswith(f"{o}.") for o in below if o != k)]
    return sum(sum(counts[k].values()) for k in outermost)


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
