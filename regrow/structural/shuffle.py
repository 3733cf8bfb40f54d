"""A stand-in for torchvision's ShuffleNetV2 block, written so that channel pruning can go around its shuffle.

torchvision's ``InvertedResidual`` (``torchvision.models.shufflenetv2``) ends with ``channel_shuffle``, a
function that interleaves the block's two halves with a view, a transpose and a view back. torch-pruning maps
those reshapes as if they flattened channels and divides by zero doing so; and no channel-by-channel mapping
would be right anyway, since each later block splits the interleaved channels in half again. The channels that
go through a shuffle (the stages' trunk and each branch's output) keep their width; what can shrink is the
inner width of each block's ``branch2`` (its first 1x1 convolution, the depthwise one, the input of its last
1x1) and the last convolution's outputs, which hold most of the MACs.

:class:`ShuffleBlock` computes torchvision's block with the same operations in the same order (outputs equal to
the bit; the tests check), but calls the shuffle as a module, :class:`ChannelShuffle`. torch-pruning treats that
module as a layer of its own (regrow registers a handler that refuses to prune it), so the groups that reach it
are left out by name and every other group traces as in any network. Every parameter and buffer keeps its name.
The stand-in is a new module: hooks a user put on torchvision's block do not carry over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch_pruning.pruner.function import BasePruningFunc

from regrow.errors import RegrowError

SHUFFLENET = "torchvision.models.shufflenetv2."


class ChannelShuffle(nn.Module):
    """torchvision's ``channel_shuffle(x, groups)`` as a module: ``channels`` in, the same channels out,
    ``groups`` interleaved."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__()
        self.groups = groups
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.size()
        x = x.view(batch, self.groups, channels // self.groups, height, width)
        return x.transpose(1, 2).contiguous().view(batch, channels, height, width)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, channels={self.channels}"


class ShuffleBlock(nn.Module):
    """torchvision's ShuffleNetV2 ``InvertedResidual``, its shuffle called as :class:`ChannelShuffle`."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.stride = source.stride
        self.branch1 = source.branch1
        self.branch2 = source.branch2
        last = [m for m in self.branch2.modules() if isinstance(m, nn.Conv2d)][-1]
        self.shuffle = ChannelShuffle(2, 2 * last.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


class ChannelShufflePruner(BasePruningFunc):
    """torch-pruning's handler for :class:`ChannelShuffle`: its widths, and a refusal to prune it (regrow leaves
    every group that reaches a shuffle out, so it is never asked). The two pruning functions stay distinct: one
    function for both would tell torch-pruning that the shuffle's inputs and outputs are the same channels, and
    groups would run through it."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RegrowError("a channel shuffle keeps its width: the channels that go through it cannot be pruned.")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RegrowError("a channel shuffle keeps its width: the channels that go through it cannot be pruned.")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.channels


STANDINS: dict[str, type[nn.Module]] = {SHUFFLENET + "InvertedResidual": ShuffleBlock}
