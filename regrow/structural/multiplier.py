"""Depthwise convolutions with a channel multiplier, written so that channel pruning can follow them.

A convolution with ``groups == in_channels`` and ``out_channels = k * in_channels`` (timm's PiT pools its tokens
with one: 64 channels into 128) computes output channel ``o`` from input channel ``o // k`` alone, so input
channel ``c`` and output channels ``c*k`` to ``c*k + k - 1`` can go together. torch-pruning takes it for a grouped
convolution that must lose the same channels in every group: neither side could lose any ("its 64 channels can
only be removed all together"), and PiT missed the MACs budget (0.5666 kept for 0.5). The stand-in computes the
same as each input channel repeated ``k`` times (:func:`repeated`) followed by a plain depthwise convolution that
holds the same weight and bias (:func:`as_depthwise`); the trace follows the repeat
(:func:`regrow.structural.tracing.refresh_mappings`: the broadcast is element-wise for the channels, the flatten
maps channel ``c`` to those ``k``), and the depthwise convolution loses the ``k`` channels of each input channel
that goes. Parameter names stay, so state dicts load either way.
"""

from __future__ import annotations

from torch import Tensor, nn


def repeated(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``x`` (channels first) with each channel repeated as often as the depthwise ``conv`` has channels per
    channel of ``x``: channel ``c`` becomes channels ``c*k`` to ``c*k + k - 1``."""
    k = conv.in_channels // x.shape[1]
    return x[:, :, None].expand(-1, -1, k, *x.shape[2:]).flatten(1, 2)


def as_depthwise(conv: nn.Conv2d) -> nn.Conv2d:
    """A depthwise convolution over ``conv``'s output channels holding ``conv``'s own weight and bias: applied to
    :func:`repeated` input, it computes what ``conv`` (``groups == in_channels``, a multiplier) computes."""
    out = nn.Conv2d(
        conv.out_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.out_channels,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    out.weight = conv.weight  # (out, 1, kh, kw) either way
    out.bias = conv.bias
    return out


class PitPooling(nn.Module):
    """timm's ``pit.Pooling``: the tokens through a depthwise convolution with a multiplier (here as the repeat
    and a plain depthwise convolution), the class token through a Linear."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.conv = as_depthwise(original.conv)
        self.fc = original.fc

    def forward(self, x: Tensor, cls_token: Tensor) -> tuple[Tensor, Tensor]:
        return self.conv(repeated(x, self.conv)), self.fc(cls_token)


STANDINS: dict[str, type[nn.Module]] = {"timm.models.pit.Pooling": PitPooling}
