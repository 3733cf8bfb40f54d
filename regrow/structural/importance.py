"""Importance of channel groups and heads: one score per removable unit, higher = more important.

Channel-group scores come from torch-pruning's group importances (each member layer's slice of weights
contributes, then the scores are divided by their mean so that groups can be ranked together; a Hugging Face
``Conv1D``, which torch-pruning's scorers do not know, is shown to them as the Linear it is):
``magnitude`` = group L2 norm; ``taylor`` = |w · dL/dw| with gradients summed over a few batches;
``bn_scale`` = |gamma| of the BatchNorm layers in the group (Liu et al. 2017, "Network Slimming");
``random``.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from types import SimpleNamespace
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from regrow.batches import forward, model_device, to_device, unpack
from regrow.errors import RegrowError, one_of
from regrow.structural.graph import ChannelGroup
from regrow.structural.heads import HeadGroup
from regrow.structural.pruners import TransposedLinearPruner, linear_weight
from regrow.tasks import task_loss

GROUP_CRITERIA = ("bn_scale", "magnitude", "random", "taylor")
TAYLOR_BATCHES = 8
_LAYERS = [nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm]


def _scorer(criterion: str) -> Any:
    # Fresh objects with explicit target_types: torch-pruning's defaults are shared mutable lists.
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, target_types=list(_LAYERS))
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(target_types=list(_LAYERS))
    if criterion == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise one_of("criterion for structural patterns", criterion, GROUP_CRITERIA)


def _linear_view(layer: nn.Module) -> nn.Linear:
    """A Linear over a Conv1D's weight (a transposed view, its gradient too), for torch-pruning's scorers."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.weight = nn.Parameter(linear_weight(layer).detach(), requires_grad=False)
    if layer.weight.grad is not None:
        linear.weight.grad = layer.weight.grad.t()
    linear.bias = None if getattr(layer, "bias", None) is None else nn.Parameter(layer.bias.detach())
    return linear


def _scorable(group: Any) -> Any:
    """``group``, its Conv1D members shown as Linear layers (their dependencies as torch-pruning's Linear
    handlers), as a list of torch-pruning's group items."""
    items = []
    for item in group:
        dep, idxs = item
        owner = getattr(dep.handler, "__self__", None)
        if isinstance(owner, TransposedLinearPruner):
            out = dep.handler.__name__ == "prune_out_channels"
            fn = tp.pruner.function.prune_linear_out_channels if out else tp.pruner.function.prune_linear_in_channels
            layer = _linear_view(dep.layer)  # torch-pruning's scorers read a dependency by either name
            dep = SimpleNamespace(layer=layer, pruning_fn=fn, target=SimpleNamespace(module=layer), handler=fn)
        shown = tp._helpers.GroupItem(dep=dep, idxs=idxs)
        shown.root_idxs = item.root_idxs
        items.append(shown)
    return items


def accumulate_gradients(model: nn.Module, data: Iterable[Any] | None, batches: int = TAYLOR_BATCHES) -> None:
    """Sum cross-entropy gradients over a few batches into ``.grad`` (eval mode, for taylor scores)."""
    if data is None:
        raise RegrowError("criterion 'taylor' needs data: pass data= (an iterable of (inputs, targets) batches).")
    device = model_device(model)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    seen = 0
    try:
        for batch in islice(data, batches):
            # timm's TinyViT, LeViT, EfficientFormer and EfficientViT (MSRA) cache their attention biases in eval
            # mode and empty the cache on train(): filled under autograd, it tied the next batch's graph to this
            # one's, freed by its backward ("Trying to backward through the graph a second time")
            model.eval()
            inputs, labels = unpack(batch)
            loss = task_loss(forward(model, to_device(inputs, device)), to_device(labels, device))
            loss.backward()
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise RegrowError("criterion 'taylor' got an empty data iterable; it needs at least one batch.")


def channel_scores(group: ChannelGroup, criterion: str) -> Tensor | None:
    """Per-unit scores of a channel group, or None when the criterion finds nothing to score in it."""
    if criterion == "random":
        return torch.rand(group.units)
    with torch.no_grad():
        imp = _scorer(criterion)(_scorable(group.full))
    if imp is None or not torch.isfinite(imp).all():
        return None
    imp = imp.float().cpu()
    units = group.unit_channels
    if group.unit_size * len(units) == len(imp):  # every unit as wide: one gather
        return imp[torch.tensor(units)].mean(dim=1)
    return torch.stack([imp[list(channels)].mean() for channels in units])


def head_scores(group: HeadGroup, model: nn.Module, criterion: str) -> Tensor:
    if criterion == "random":
        return torch.rand(group.units)
    if criterion == "bn_scale":
        raise RegrowError(
            "criterion 'bn_scale' scores BatchNorm channels; with pattern 'head' use magnitude, taylor or random."
        )
    if criterion not in GROUP_CRITERIA:
        raise one_of("criterion for structural patterns", criterion, GROUP_CRITERIA)
    scores = group.scores(model, use_grad=criterion == "taylor")
    mean = scores.mean()
    return scores / mean if mean > 0 else scores
