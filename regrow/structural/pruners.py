"""Layer handlers that torch-pruning lacks or gets wrong, registered per dependency graph.

* ``nn.RMSNorm`` and the norms libraries write as plain modules (timm's ``RmsNorm``, ``RmsNorm2d``,
  ``SimpleNorm``: a ``normalized_shape`` and a weight of that shape, :func:`is_plain_norm`): torch-pruning
  1.6 has no handler, treats the weight as a loose parameter, slices it and leaves ``normalized_shape``
  stale, so the model fails on its next forward. :class:`NormPruner` slices the weight (and a bias) *and*
  updates ``normalized_shape``; the graph then sees the norm as a layer, which the equivalence check
  simulates over the surviving channels (regrow.structural.simulate).
* regrow's :class:`~regrow.structural.attention.MultiheadAttention`: its input and output width (the
  residual stream) are pruned like a Linear layer's; its inner width only loses whole heads, never by
  channel, so the dependency graph treats it as one opaque layer.
* Hugging Face's ``Conv1D`` (GPT-2 and its kin: a Linear whose weight is stored (inputs, outputs), ``nf`` its
  output width): torch-pruning has no handler, saw its weight and bias as loose parameters, and no channel
  group of GPT-2 had a layer to start from. :class:`TransposedLinearPruner` shrinks it as the Linear it is.
* A GroupNorm without a bias (``nn.GroupNorm(..., bias=False)``, timm's ``GroupNorm1NoBias`` in PoolFormer v2):
  torch-pruning's handler slices the bias whenever the norm is affine and failed on ``None``; every group through
  such a norm was left out. :class:`GroupNormPruner` slices what the norm has (used by
  :func:`regrow.structural.graph.apply_cuts`, which shrinks the layers).
* timm's ``BlurPool2d`` (anti-aliased downsampling: TResNet, the ResNet "blur" variants): a fixed depthwise
  filter, one row of its ``filt`` buffer per channel, applied with ``groups=self.channels``. torch-pruning saw a
  convolution with a buffer for its weight as an element-wise op, so the channels went through it uncut and the
  shrunk model failed (``Given groups=128 ... but got 125 channels``). :class:`ChannelFilterPruner` takes it as
  a layer whose inputs and outputs are the same channels, and slices the buffer with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch_pruning.pruner import function
from torch_pruning.pruner.function import BasePruningFunc

from regrow.select import is_transposed_linear
from regrow.structural.attention import MultiheadAttention
from regrow.structural.shuffle import ChannelShuffle, ChannelShufflePruner


def _keep(total: int, idxs: Sequence[int]) -> list[int]:
    gone = set(idxs)
    return [i for i in range(total) if i not in gone]


def _select(param: nn.Parameter, keep: Sequence[int] | Tensor, dim: int) -> nn.Parameter:
    index = torch.as_tensor(keep, dtype=torch.long, device=param.device)
    return nn.Parameter(param.detach().index_select(dim, index).contiguous(), requires_grad=param.requires_grad)


def is_plain_norm(module: nn.Module) -> bool:
    """A normalisation over one dimension written as a plain module: a one-dimensional ``normalized_shape``, no
    parameters but a weight and a bias of that shape (or None), and no submodules but ones without state (timm's
    ``RmsNormAct2d`` applies its activation and dropout after the norm; the equivalence check holds them to
    the simulation like the rest). torch's LayerNorm is left to torch-pruning's own handler."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(module, nn.LayerNorm) or not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return False
    params = dict(module.named_parameters(recurse=False))
    fits = all(p.shape == tuple(shape) for p in params.values())
    stateless = not any(True for c in module.children() for _ in (*c.parameters(), *c.buffers()))
    return fits and set(params) <= {"weight", "bias"} and stateless


class GroupNormPruner(function.GroupNormPruner):
    """torch-pruning's GroupNorm handler, for a norm whose weight or bias may be None."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.num_channels, idxs)
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                setattr(layer, name, _select(getattr(layer, name), keep, 0))
        layer.num_channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels


CHANNEL_FILTERS = ("timm.layers.blur_pool.BlurPool2d",)


def is_channel_filter(module: nn.Module) -> bool:
    """A fixed depthwise filter with one row of its buffer ``filt`` per channel, and its channel count stored
    (``channels``; None where one row is broadcast to the input's width)."""
    named = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    return bool(named & set(CHANNEL_FILTERS)) and isinstance(getattr(module, "filt", None), Tensor)


class ChannelFilterPruner(BasePruningFunc):
    """Shrinks a channel filter (:func:`is_channel_filter`): the rows of its buffer and its channel count. One
    function for both directions: its inputs and outputs are the same channels. A filter without a channel
    count (``channels=None``: one row, broadcast to the input's width) has nothing to shrink."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.channels is not None:
            keep = torch.as_tensor(_keep(layer.channels, idxs), dtype=torch.long, device=layer.filt.device)
            layer.filt = layer.filt.index_select(0, keep).contiguous()
            layer.channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return layer.channels

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return layer.channels


class NormPruner(BasePruningFunc):
    """Prunes the normalized dimension of a plain norm (:func:`is_plain_norm`), keeping ``normalized_shape``
    true."""

    def __init__(self) -> None:
        super().__init__(pruning_dim=-1)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.normalized_shape[-1], idxs)
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                param = getattr(layer, name)
                setattr(layer, name, _select(param, keep, param.dim() - 1))
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


def linear_weight(layer: nn.Module) -> Tensor:
    """The layer's weight as (outputs, inputs): Hugging Face's Conv1D stores it transposed (a view here)."""
    return layer.weight.t() if is_transposed_linear(layer) else layer.weight


def keep_rows(layer: nn.Module, keep: Tensor) -> None:
    """Keep only the ``keep`` outputs of a Linear (or Conv1D)."""
    if is_transposed_linear(layer):
        layer.weight = _select(layer.weight, keep, 1)
        layer.nf = len(keep)
    else:
        layer.weight = _select(layer.weight, keep, 0)
        layer.out_features = len(keep)
    if layer.bias is not None:
        layer.bias = _select(layer.bias, keep, 0)


def keep_columns(layer: nn.Module, keep: Tensor) -> None:
    """Keep only the ``keep`` inputs of a Linear (or Conv1D)."""
    if is_transposed_linear(layer):
        layer.weight = _select(layer.weight, keep, 0)
        if isinstance(getattr(layer, "nx", None), int):
            layer.nx = len(keep)
    else:
        layer.weight = _select(layer.weight, keep, 1)
        layer.in_features = len(keep)


class TransposedLinearPruner(BasePruningFunc):
    """Hugging Face's ``Conv1D``: outputs along the weight's dim 1 (and the bias), inputs along its dim 0."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep_rows(layer, torch.tensor(_keep(layer.weight.shape[1], idxs), dtype=torch.long))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep_columns(layer, torch.tensor(_keep(layer.weight.shape[0], idxs), dtype=torch.long))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


def customized_pruners(model: nn.Module | None = None) -> dict[type, BasePruningFunc]:
    """Fresh handler instances for each dependency graph, so no state is shared between graphs; with ``model``,
    also one for each class of plain norm it holds."""
    pruners: dict[type, BasePruningFunc] = {
        MultiheadAttention: AttentionPruner(),
        ChannelShuffle: ChannelShufflePruner(),
    }
    if hasattr(nn, "RMSNorm"):
        pruners[nn.RMSNorm] = NormPruner()
    for module in model.modules() if model is not None else ():
        if type(module) not in pruners and is_plain_norm(module):
            pruners[type(module)] = NormPruner()
        elif type(module) not in pruners and is_transposed_linear(module):
            pruners[type(module)] = TransposedLinearPruner()
        elif type(module) not in pruners and is_channel_filter(module):
            pruners[type(module)] = ChannelFilterPruner()
    return pruners
