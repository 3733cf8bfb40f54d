"""Stand-ins for torchvision's windowed attention (Swin, MaxViT), written so that channel pruning can follow it.

torchvision's ``ShiftedWindowAttention`` (and its V2) calls its ``qkv`` and ``proj`` weights through
``F.linear``: torch-pruning then sees no layers there, only loose parameters, and grouping a ``swin_t`` runs
past regrow's time limit. It also ties the attention's inner width to the width of its input
(``C // num_heads`` per head), so a narrower residual stream would break it. Its ``PatchMerging`` gathers 2x2
patches with four strided slices concatenated on the channels, which torch-pruning cannot map. MaxViT's
``RelativePositionalMultiHeadAttention`` also ties its inner width to its input's (``reshape(B, G, P, D)``), and its
``einsum`` products, traced, tie the heads into every residual group: grouping a small MaxViT did not end.

:class:`WindowAttention` and :class:`PatchMerging` compute the same functions, with the same operations in
the same order (outputs equal to the bit; the tests check), but call their layers as modules, read the head
width from ``qkv``, and gather patches with one reshape (timm's form, which regrow's tracing follows).
:class:`RelativeAttention` computes MaxViT's attention with ``matmul`` where torchvision calls ``einsum`` (the
same products; equal to the bit on the CPU in the tests) and its output width from ``merge``. Every
parameter and buffer keeps its name, so state dicts load either way. :mod:`regrow.structural.standins` swaps
them in (``arch.json`` records the swap); torchvision is never imported: its classes are recognised by name.

The stand-ins are new modules: hooks a user put on torchvision's modules do not carry over. torchvision wraps its
Swin functions with ``torch.fx.wrap`` so that ``torch.fx`` can trace the model (``create_feature_extractor``); the
stand-ins branch on the input's shape, which ``torch.fx`` cannot trace. A model that is itself one of these
modules is left as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

TORCHVISION = "torchvision.models.swin_transformer."
MAXVIT = "torchvision.models.maxvit."


class WindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` (``cosine``), layers called as
    modules; the inner width is ``qkv``'s, the output width ``proj``'s."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.window_size = list(source.window_size)
        self.shift_size = list(source.shift_size)
        self.num_heads = int(source.num_heads)
        self.attention_dropout = float(source.attention_dropout)
        self.dropout = float(source.dropout)
        self.cosine = hasattr(source, "logit_scale")
        self.qkv = source.qkv
        self.proj = source.proj
        if self.cosine:
            self.logit_scale = source.logit_scale
            self.cpb_mlp = source.cpb_mlp
            self.register_buffer("relative_coords_table", source.relative_coords_table)
        else:
            self.relative_position_bias_table = source.relative_position_bias_table
        self.register_buffer("relative_position_index", source.relative_position_index)

    def relative_position_bias(self) -> Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads) if self.cosine else None
        table = self.relative_position_bias_table if table is None else table
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        window, shift = self.window_size, list(self.shift_size)
        x = F.pad(x, (0, 0, 0, (window[1] - w % window[1]) % window[1], 0, (window[0] - h % window[0]) % window[0]))
        _, pad_h, pad_w, c = x.shape
        shift = [0 if window[i] >= (pad_h, pad_w)[i] else shift[i] for i in range(2)]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (pad_h // window[0]) * (pad_w // window[1])
        x = x.view(b, pad_h // window[0], window[0], pad_w // window[1], window[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * windows, window[0] * window[1], c)
        attn, v = self._scores(x)
        if sum(shift) > 0:
            mask = _shift_mask(x, pad_h, pad_w, window, shift)
            attn = attn.view(x.size(0) // windows, windows, self.num_heads, x.size(1), x.size(1))
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, x.size(1), x.size(1))
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        c = x.size(-1)
        x = x.view(b, pad_h // window[0], pad_w // window[1], window[0], window[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()

    def _scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attention logits (relative position bias added) and values, per window and head."""
        if self.cosine and self.qkv.bias is not None:  # V2 has no key bias: zeroed on every call, as torchvision
            bias = self.qkv.bias.clone()
            third = bias.numel() // 3
            bias[third : 2 * third].zero_()
            qkv = functional_call(self.qkv, {"bias": bias}, (x,))  # still a call of the module, for the tracing
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * q.size(-1) ** -0.5).matmul(k.transpose(-2, -1))
        return attn + self.relative_position_bias(), v


def _shift_mask(x: Tensor, pad_h: int, pad_w: int, window: list[int], shift: list[int]) -> Tensor:
    """-100 between tokens of one window that come from different regions of the shifted map, else 0."""
    mask = x.new_zeros((pad_h, pad_w))
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class PatchMerging(nn.Module):
    """torchvision's ``PatchMerging`` (``v2``: ``PatchMergingV2``, normalised after the reduction), each 2x2
    patch gathered by one reshape, in torchvision's order (rows fastest)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.v2 = type(source).__name__ == "PatchMergingV2"
        self.reduction = source.reduction
        self.norm = source.norm

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        _, h, w, _ = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x)) if self.v2 else self.reduction(self.norm(x))


class RelativeAttention(nn.Module):
    """torchvision's MaxViT ``RelativePositionalMultiHeadAttention``, with ``matmul`` for its ``einsum`` and an
    inner width of its own."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.n_heads = int(source.n_heads)
        self.head_dim = int(source.head_dim)
        self.size = int(source.size)
        self.max_seq_len = int(source.max_seq_len)
        self.scale_factor = float(source.scale_factor)  # torchvision scales by the input width, kept as it was
        self.to_qkv = source.to_qkv
        self.merge = source.merge
        self.relative_position_bias_table = source.relative_position_bias_table
        self.register_buffer("relative_position_index", source.relative_position_index)

    def relative_position_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.max_seq_len, self.max_seq_len, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        b, g, p, _ = x.shape
        q, k, v = (
            t.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
            for t in torch.chunk(self.to_qkv(x), 3, dim=-1)
        )
        scores = q.matmul((k * self.scale_factor).transpose(-2, -1))
        attn = F.softmax(scores + self.relative_position_bias(), dim=-1)
        return self.merge(attn.matmul(v).permute(0, 1, 3, 2, 4).reshape(b, g, p, -1))


STANDINS: dict[str, type[nn.Module]] = {
    TORCHVISION + "ShiftedWindowAttention": WindowAttention,
    TORCHVISION + "ShiftedWindowAttentionV2": WindowAttention,
    TORCHVISION + "PatchMerging": PatchMerging,
    TORCHVISION + "PatchMergingV2": PatchMerging,
    MAXVIT + "RelativePositionalMultiHeadAttention": RelativeAttention,
}
