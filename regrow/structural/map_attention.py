"""Stand-ins for timm attention over channels-first feature maps, scored by products of ``(B, C, H*W)`` maps:
EfficientViT (MSRA)'s cascaded group attention, iFormer's single-head modulation attention, SHViT's single-head
attention over part of the stream and EfficientViT (MIT)'s multi-scale linear attention.

Their products are ``torch.bmm`` where timm writes ``@`` of the same 3-D tensors (which ``matmul`` computes with
``bmm``, after views of its operands that the trace read as reshapes), and they mark their tensors where the shapes
cannot tell the trace which dimension holds the channels (regrow.structural.marks): the scores hold none, the
flattened queries, keys and values and the outputs keep theirs in dim 1. A query channel then goes with the key
channel it meets (one unit; the scale stays), and the values with what they are summed or multiplied with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regrow.structural.marks import channel_free, is_reading, same_channels
from regrow.structural.timm_attention import TIMM, _Adopted


def _conv(module: nn.Module, name: str) -> nn.Module:
    """The convolution of one of timm's convolution-and-norm modules (its child ``name``), or the module itself
    once timm's ``fuse`` (``reparameterize_model``) has folded the norm into a plain convolution."""
    return getattr(module, name, module)


class CascadedGroupAttention(_Adopted):
    """timm's ``efficientvit_msra.CascadedGroupAttention``. Each head reads its own slice of the input and adds to
    it the previous head's output (the cascade), computes queries, keys and values with its own 1x1 convolution,
    convolves its queries depthwise and attends; the heads' outputs are concatenated into a final projection.
    timm slices the input with ``x.chunk(num_heads)`` and splits each head's projection by the widths it stores
    (``key_dim``, ``val_dim``), so the stream the attention reads (whose channels are those slices, and every
    value's, through the cascade's sums) could not lose a channel: every stream of the model, and every head's
    projection, was left out of channel pruning (efficientvit_m0: 42 groups, "shrinking it breaks the forward
    pass"). Here the input is sliced by the width each head's projection reads and the projection's output split
    by the width of its queries' depthwise convolution, so each slice of the stream can lose its own channels, with
    the values they are summed with, and each head its own query and key channels.

    The attention biases are gathered on every call rather than cached per device as timm does in eval mode: the
    stand-in's ``train`` and ``to`` are nn.Module's, which would not empty timm's cache after the biases are
    trained."""

    per_head_parameters = ("attention_biases",)  # a table of biases for each head: no channel's (offsets.py)

    def get_attention_biases(self, device: torch.device) -> Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        feats_in = x.split([_conv(qkv, "conv").in_channels for qkv in self.qkvs], dim=1)
        feats_out = []
        feat = feats_in[0]
        attn_bias = self.get_attention_biases(x.device)
        for head_idx, (qkv, dws) in enumerate(zip(self.qkvs, self.dws)):
            if head_idx > 0:
                feat = feat + feats_in[head_idx]
            feat = qkv(feat)
            key = _conv(dws, "conv").in_channels
            q, k, v = feat.view(b, -1, h, w).split([key, key, feat.shape[1] - 2 * key], dim=1)
            q = dws(q)
            q, k, v = same_channels(q.flatten(2)), same_channels(k.flatten(2)), same_channels(v.flatten(2))
            q = q * self.scale
            attn = channel_free(torch.bmm(q.transpose(-2, -1), k))
            attn = attn + attn_bias[head_idx]
            attn = attn.softmax(dim=-1)
            feat = same_channels(torch.bmm(v, attn.transpose(-2, -1)).view(b, -1, h, w))
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


class SingleHeadModulation(_Adopted):
    """timm's ``iformer.SHMA``: one head over a map (or over windows of it), its output gated by a sigmoid of a
    second half of the values' projection. timm computes it fused, ``scaled_dot_product_attention``, whose inputs
    the trace reads as one element-wise op, and whose scale is one over the root of the queries' width: every
    query channel went with all the others ("its 512 channels can only be removed all together") and with the
    values. Here it is computed as timm's unfused path does, with the scale timm stores, so a query channel goes
    with its key and the temperature stays; the same numbers but for rounding (the fused kernel sums in another
    order)."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        windowed = bool(self.window_size) and self.window_size > 0
        if windowed:
            pad_r = (self.window_size - w % self.window_size) % self.window_size
            pad_b = (self.window_size - h % self.window_size) % self.window_size
            x_pad = F.pad(x, (0, pad_r, 0, pad_b))
            height, width, padded = h, w, x_pad.shape[2:]
            x = self._window_partition(x_pad, self.window_size)
            b, _, h, w = x.shape
        v, gate = self.gate_act(self.v_gate(x)).chunk(2, dim=1)
        q = same_channels(self.q(x).flatten(2))
        k = same_channels(self.k(x).flatten(2))
        v = same_channels(v.flatten(2))
        attn = channel_free(torch.bmm((q * self.scale).transpose(-2, -1), k)).softmax(dim=-1)
        attn = self.attn_drop(attn)
        out = self.proj(same_channels(torch.bmm(v, attn.transpose(-2, -1)).view(b, -1, h, w)) * gate)
        if windowed:
            out = self._window_reverse(out, self.window_size, *padded)
            if pad_r > 0 or pad_b > 0:
                out = out[:, :, :height, :width].contiguous()
        return out


class PartialSingleHeadAttention(_Adopted):
    """timm's ``shvit.SHSA``: one head over the first ``pdim`` channels of the stream; the other channels pass by it
    and are concatenated after its output into the output projection. timm splits the stream, the queries', keys'
    and values' projection and reshapes the output by the widths it stores (``pdim``, ``qk_dim``), so neither the
    stream nor the projection could lose a channel (shvit_s1: 11 groups left out, "shrinking it breaks the forward
    pass"). Here the stream is split at the width the projection reads, and the values are as wide as the output
    projection's inputs that the stream's other part does not fill, the queries and keys sharing the rest: the
    part of the stream the head reads, the values it writes and the queries with their keys each lose channels of
    their own."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        part = _conv(self.qkv, "c").in_channels
        x1, x2 = torch.split(x, [part, x.shape[1] - part], dim=1)
        qkv = self.qkv(self.pre_norm(x1))
        values = _conv(self.proj[1], "c").in_channels - x2.shape[1]
        key = (qkv.shape[1] - values) // 2
        q, k, v = torch.split(qkv, [key, key, values], dim=1)
        q, k, v = same_channels(q.flatten(2)), same_channels(k.flatten(2)), same_channels(v.flatten(2))
        attn = channel_free(torch.bmm(q.transpose(-2, -1), k)) * self.scale
        attn = attn.softmax(dim=-1)
        x1 = same_channels(torch.bmm(v, attn.transpose(-2, -1)).view(b, -1, h, w))
        return self.proj(torch.cat([x1, x2], dim=1))


class MultiScaleLinearAttention(_Adopted):
    """timm's ``efficientvit_mit.LiteMLA`` (EfficientViT-B and -L): a 1x1 projection to queries, keys and values,
    each head's three together (``3 * dim`` channels a head), the same again aggregated by a depthwise and a grouped
    1x1 convolution (one group for each head's queries, keys or values) for each further scale, and linear
    attention in each head: ``q @ (k^T @ [v, 1])``, the last column the normaliser. timm concatenates the scales and
    splits the heads with ``reshape(B, -1, 3 * self.dim, H * W)``, a reshape the trace could not map: every
    attention's projection and aggregation was left out of channel pruning (efficientvit_b0: 12 groups, "index 1023
    reached _Reshape_38()").

    A scale's queries, keys and values must each keep one width in every head (the reshape, and its grouped
    convolution), so its unit is one channel index of every head's queries, keys and values together, with the
    output projection's inputs that the values write; each scale loses its own. Here each scale is split into heads
    by their count (the grouped convolution's groups over three), not by ``dim``, and attends on its own, timm's
    batched computation (all scales at once, as timm does, while their head widths are equal), equal to timm's to
    the bit. Inside regrow's trace only (regrow.structural.marks.is_reading) the heads are computed one at a time
    from ``(B, C, H*W)`` maps, the same function (but for rounding) in a form the trace follows: the chunks of each
    head and of its queries, keys and values tie their channel indices, the scores ``v @ k^T`` carry none. A LiteMLA
    without a further scale (no timm model builds one) has no grouped convolution to count its heads; it is computed
    as timm does and stays whole. ``dim`` follows the first scale's head width (regrow.structural.stored)."""

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        scales = [qkv, *(op(qkv) for op in self.aggreg)]
        if not len(self.aggreg):
            return self.proj(self._batched(qkv, qkv.shape[1] // (3 * self.dim)))
        heads = _conv(self.aggreg[0], "1").groups // 3
        if is_reading():
            return self.proj(torch.cat([self._traced(scale, heads) for scale in scales], dim=1))
        if len({scale.shape[1] for scale in scales}) == 1:  # one head width: all scales at once, as timm does
            return self.proj(self._batched(torch.cat(scales, dim=1), heads * len(scales)))
        return self.proj(torch.cat([self._batched(scale, heads) for scale in scales], dim=1))

    def _batched(self, scale: Tensor, heads: int) -> Tensor:
        b, c, h, w = scale.shape
        q, k, v = scale.reshape(b, heads, c // heads, h * w).transpose(-1, -2).chunk(3, dim=-1)
        q, k = self.kernel_func(q), self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        if v.device.type != "meta":
            with torch.autocast(device_type=v.device.type, enabled=False):
                out = self._attn(q, k, v)
        else:
            out = self._attn(q, k, v)
        return out.transpose(-1, -2).reshape(b, -1, h, w)

    def _traced(self, scale: Tensor, heads: int) -> Tensor:
        b, _, h, w = scale.shape
        out = []
        for head in same_channels(scale.flatten(2)).chunk(heads, dim=1):
            q, k, v = head.chunk(3, dim=1)
            q, k = self.kernel_func(q), self.kernel_func(k)
            kv = channel_free(torch.bmm(v, k.transpose(-2, -1)))  # values by keys
            total = torch.bmm(k.sum(-1, keepdim=True).transpose(-2, -1), q)  # the normaliser, one row
            out.append(same_channels((torch.bmm(kv, q) / (total + self.eps)).view(b, -1, h, w)))
        return torch.cat(out, dim=1)


STANDINS: dict[str, type[nn.Module]] = {
    TIMM + "efficientvit_msra.CascadedGroupAttention": CascadedGroupAttention,
    TIMM + "iformer.SHMA": SingleHeadModulation,
    TIMM + "shvit.SHSA": PartialSingleHeadAttention,
    TIMM + "efficientvit_mit.LiteMLA": MultiScaleLinearAttention,
}
