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

Any other plain ``nn.Conv2d`` with a channel multiplier (FastViT's patch embeddings, whose stream groups were one
unit each) gets :class:`MultipliedConv2d`, the same repeat and depthwise convolution in one module, as its stand-in
(:func:`regrow.structural.standins.standin_for`).
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


def is_multiplier(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` that is depthwise with a channel multiplier: ``groups == in_channels`` (more than
    one) and ``out_channels = k * in_channels``, k > 1 (FastViT's patch embeddings: 48 channels into 96)."""
    if type(module) is not nn.Conv2d or module.groups != module.in_channels or module.groups < 2:
        return False
    return module.out_channels > module.in_channels and module.out_channels % module.in_channels == 0


class MultipliedConv2d(nn.Conv2d):
    """A depthwise convolution with a channel multiplier (:func:`is_multiplier`), computed as each input channel
    repeated then a plain depthwise convolution over the copies, with the original's own weight and bias
    (``weight`` and ``bias`` keep their names and shapes). The stand-in for any such convolution."""

    def __init__(self, source: nn.Conv2d) -> None:
        width = source.out_channels
        super().__init__(
            width,
            width,
            source.kernel_size,
            stride=source.stride,
            padding=source.padding,
            dilation=source.dilation,
            groups=width,
            bias=source.bias is not None,
            padding_mode=source.padding_mode,
            device="meta",
        )
        self.weight = source.weight
        self.bias = source.bias
        self.train(source.training)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(repeated(x, self))


STANDINS: dict[str, type[nn.Module]] = {"timm.models.pit.Pooling": PitPooling}
