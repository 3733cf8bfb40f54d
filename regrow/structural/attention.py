"""Multi-head attention whose heads can be removed one by one.

``torch.nn.MultiheadAttention`` ties its inner width (``num_heads * head_dim``) to ``embed_dim``, the width
of the residual stream: removing a head would force the same channels out of every layer that shares the
stream. :class:`MultiheadAttention` computes exactly the same function with separate q / k / v / out
projections whose inner width is free, so a head is removed by slicing four Linear layers of one block.
:func:`convert_attention` swaps it in for every ``nn.MultiheadAttention`` of a model, copying the weights,
before structural pruning; ``arch.json`` records the swap so that :func:`regrow.load` repeats it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regrow.errors import RegrowError


class MultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same forward signature and outputs), with prunable heads."""

    # Read by nn.TransformerEncoderLayer's fast-path check; None / False send it down the regular path.
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int | None = None,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.batch_first = batch_first
        self.dropout = dropout
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def init_args(self) -> dict[str, Any]:
        """Constructor arguments (recorded in arch.json)."""
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "bias": self.q_proj.bias is not None,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
        }

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """The same function as ``mha``, with its weights copied."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise RegrowError(
                "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True cannot have its heads "
                "pruned by regrow; leave the module out with 'ignore'."
            )
        out = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.head_dim,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            dropout=mha.dropout,
        )
        out = out.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        e = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                q_w, k_w, v_w = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e], mha.in_proj_weight[2 * e :]
            else:
                q_w, k_w, v_w = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            out.q_proj.weight.copy_(q_w)
            out.k_proj.weight.copy_(k_w)
            out.v_proj.weight.copy_(v_w)
            if mha.in_proj_bias is not None:
                out.q_proj.bias.copy_(mha.in_proj_bias[:e])
                out.k_proj.bias.copy_(mha.in_proj_bias[e : 2 * e])
                out.v_proj.bias.copy_(mha.in_proj_bias[2 * e :])
            out.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                out.out_proj.bias.copy_(mha.out_proj.bias)
        out.train(mha.training)
        return out

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        src = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, length, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)

        mask = _merge_masks(attn_mask, key_padding_mask, n, h, length, src, q.dtype, q.device)
        if is_causal and mask is None:
            mask = torch.full((length, src), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            weights = probs.mean(dim=1) if average_attn_weights else probs
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, h * d))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    @torch.no_grad()
    def remove_heads(self, heads: Sequence[int]) -> None:
        """Remove whole heads (indices into the current heads) in place."""
        heads = sorted(set(int(i) for i in heads))
        if not heads:
            return
        if len(heads) >= self.num_heads:
            raise RegrowError(f"cannot remove all {self.num_heads} heads of an attention module; keep at least one.")
        keep = keep_index(self.num_heads, self.head_dim, heads, self.q_proj.weight.device)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _select_rows(proj, keep)
        _select_columns(self.out_proj, keep)
        self.num_heads -= len(heads)


def keep_index(num_heads: int, head_dim: int, removed: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Inner-dimension indices that survive when ``removed`` heads go."""
    gone = set(removed)
    return torch.tensor(
        [h * head_dim + j for h in range(num_heads) if h not in gone for j in range(head_dim)],
        dtype=torch.long,
        device=device,
    )


def _select_rows(linear: nn.Linear, keep: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.index_select(0, keep).contiguous())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, keep).contiguous())
    linear.out_features = len(keep)


def _select_columns(linear: nn.Linear, keep: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.index_select(1, keep).contiguous())
    linear.in_features = len(keep)


def _merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    h: int,
    length: int,
    src: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """nn.MultiheadAttention's mask conventions (bool True = masked out; float = added) as one float mask."""

    def as_float(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        merged = as_float(attn_mask)
        if merged.dim() == 3:  # (N * H, L, S)
            merged = merged.view(n, h, length, src)
    if key_padding_mask is not None:
        pad = as_float(key_padding_mask).view(n, 1, 1, src)
        merged = pad if merged is None else merged + pad
    return merged


def convert_attention(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (but those in ``skip``) in place; returns their names."""
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and name and name not in skip:  # the root has no parent
            set_submodule(model, name, MultiheadAttention.from_torch(module))
            converted.append(name)
    return converted


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
