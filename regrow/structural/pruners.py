"""Layer handlers that torch-pruning lacks or gets wrong, registered per dependency graph.

* ``nn.RMSNorm``: torch-pruning 1.6 has no handler, treats its weight as a loose parameter, slices it and
  leaves ``normalized_shape`` stale, so the model fails on its next forward. :class:`RMSNormPruner`
  slices the weight *and* updates ``normalized_shape``.
* regrow's :class:`~regrow.structural.attention.MultiheadAttention`: its input and output width (the
  residual stream) are pruned like a Linear layer's; its inner width only loses whole heads, never by
  channel, so the dependency graph treats it as one opaque layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from regrow.structural.attention import MultiheadAttention
from regrow.structural.shuffle import ChannelShuffle, ChannelShufflePruner


def _keep(total: int, idxs: Sequence[int]) -> list[int]:
    gone = set(idxs)
    return [i for i in range(total) if i not in gone]


def _select(param: nn.Parameter, keep: list[int], dim: int) -> nn.Parameter:
    index = torch.tensor(keep, dtype=torch.long, device=param.device)
    return nn.Parameter(param.detach().index_select(dim, index).contiguous(), requires_grad=param.requires_grad)


class RMSNormPruner(BasePruningFunc):
    """Prunes the last normalized dimension of ``nn.RMSNorm`` and keeps ``normalized_shape`` true."""

    def __init__(self) -> None:
        super().__init__(pruning_dim=-1)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.normalized_shape[-1], idxs)
        if layer.weight is not None:
            layer.weight = _select(layer.weight, keep, layer.weight.dim() - 1)
        layer.normalized_shape = (*tuple(layer.normalized_shape[:-1]), len(keep))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.normalized_shape[-1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.normalized_shape[-1]


class AttentionPruner(BasePruningFunc):
    """Residual-stream width of regrow's MultiheadAttention: q/k/v input columns, out_proj output rows."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.embed_dim, idxs)
        proj = layer.out_proj
        proj.weight = _select(proj.weight, keep, 0)
        if proj.bias is not None:
            proj.bias = _select(proj.bias, keep, 0)
        proj.out_features = len(keep)
        layer.embed_dim = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.q_proj.in_features, idxs)
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = getattr(layer, name)
            if proj.in_features != len(keep) + len(idxs):
                continue  # cross-attention input of another width: not part of this group
            proj.weight = _select(proj.weight, keep, 1)
            proj.in_features = len(keep)
        layer.kdim, layer.vdim = layer.k_proj.in_features, layer.v_proj.in_features
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.q_proj.in_features


def customized_pruners() -> dict[type, BasePruningFunc]:
    """Fresh handler instances for each dependency graph, so no state is shared between graphs."""
    pruners: dict[type, BasePruningFunc] = {
        MultiheadAttention: AttentionPruner(),
        ChannelShuffle: ChannelShufflePruner(),
    }
    if hasattr(nn, "RMSNorm"):
        pruners[nn.RMSNorm] = RMSNormPruner()
    return pruners
