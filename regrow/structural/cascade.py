"""A stand-in for EfficientViT (MSRA)'s cascaded group attention (timm's ``efficientvit_msra.
CascadedGroupAttention``).

Each head reads its own slice of the input and adds to it the previous head's output (the cascade), computes
queries, keys and values with its own 1x1 convolution, convolves its queries depthwise and attends; the heads'
outputs are concatenated into a final projection. timm slices the input with ``x.chunk(num_heads)`` and splits
each head's projection by the widths it stores (``key_dim``, ``val_dim``), so the stream the attention reads
(whose channels are those slices, and every value's, through the cascade's sums) could not lose a channel:
every stream of the model, and every head's projection, was left out of channel pruning (efficientvit_m0: 42
groups, "shrinking it breaks the forward pass"). The stand-in slices the input by the width each head's
projection reads and splits the projection's output by the width of its queries' depthwise convolution, so each
slice of the stream can lose its own channels, with the values they are summed with, and each head's queries
channels of their own, with its keys (a unit is a query channel and the key channel it meets).

Its products are ``torch.bmm`` where timm writes ``@`` of the same 3-D tensors (which ``matmul`` computes with
``bmm``, after views of its operands that the trace read as reshapes), and it marks its tensors where the shapes
cannot tell the trace which dimension holds the channels (regrow.structural.marks): the scores hold none, the
flattened queries, keys and values and the heads' outputs keep theirs in dim 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from regrow.structural.marks import channel_free, same_channels
from regrow.structural.timm_attention import TIMM, _Adopted


class CascadedGroupAttention(_Adopted):
    """timm's ``CascadedGroupAttention``, with its widths read off its layers (module docstring). The attention
    biases are gathered on every call rather than cached per device as timm does in eval mode: the stand-in's
    ``train`` and ``to`` are nn.Module's, which would not empty timm's cache after the biases are trained."""

    per_head_parameters = ("attention_biases",)  # a table of biases for each head: no channel's (offsets.py)

    def get_attention_biases(self, device: torch.device) -> Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        feats_in = x.split([qkv.conv.in_channels for qkv in self.qkvs], dim=1)
        feats_out = []
        feat = feats_in[0]
        attn_bias = self.get_attention_biases(x.device)
        for head_idx, (qkv, dws) in enumerate(zip(self.qkvs, self.dws)):
            if head_idx > 0:
                feat = feat + feats_in[head_idx]
            feat = qkv(feat)
            key = dws.conv.in_channels
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


STANDINS: dict[str, type[nn.Module]] = {TIMM + "efficientvit_msra.CascadedGroupAttention": CascadedGroupAttention}
