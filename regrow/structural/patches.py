"""A stand-in for timm's MobileViT block, whose unfolding into patches channel pruning could not follow.

timm's ``MobileVitBlock`` turns its feature map ``(B, C, H, W)`` into ``B * P`` sequences of ``N`` patches of ``C``
channels for its transformer, and back, with reshapes that fold the channels into the batch on the way:
``x.reshape(B * C * n_h, p_h, n_w, p_w)``. A reshape that merges the batch with another dimension maps no channel
(regrow.structural.tracing), so the channels of the convolution before the transformer and those of the
transformer's norms were never one group: shrinking one broke the other (``Given normalized_shape=[96], expected
input with shape [*, 96], but got input of size [8, 1, 93]``) and MobileViT's transformer width was left out.

:class:`MobileVitPatches` computes the same with the channels kept in a dimension of their own: ``(B, C, n_h, p_h,
n_w, p_w)``, permuted to ``(B, p_h, p_w, n_h, n_w, C)`` and flattened to ``(B * P, N, C)``, the same sequences in
the same order (outputs equal to the bit in the tests), and back the same way. Every other operation is timm's;
parameter and buffer names stay, so state dicts load either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from regrow.structural.timm_attention import TIMM, _Adopted


class MobileVitPatches(_Adopted):
    """timm's ``mobilevit.MobileVitBlock``, its unfold and fold written channels-apart."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        patch_h, patch_w = self.patch_size
        batch, channels, height, width = x.shape
        new_h, new_w = math.ceil(height / patch_h) * patch_h, math.ceil(width / patch_w) * patch_w
        num_h, num_w = new_h // patch_h, new_w // patch_w
        interpolate = new_h != height or new_w != width
        if interpolate:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = x.reshape(batch, channels, num_h, patch_h, num_w, patch_w).permute(0, 3, 5, 2, 4, 1)
        x = x.reshape(batch * patch_h * patch_w, num_h * num_w, channels)
        x = self.norm(self.transformer(x))
        x = x.reshape(batch, patch_h, patch_w, num_h, num_w, channels).permute(0, 5, 3, 1, 4, 2)
        x = x.reshape(batch, channels, new_h, new_w)
        if interpolate:
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


STANDINS = {TIMM + "mobilevit.MobileVitBlock": MobileVitPatches}
