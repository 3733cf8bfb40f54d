"""Loose parameters (ones no layer owns): the dimension that holds their channels."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch_pruning.dependency import shape_infer
from torch_pruning.dependency.node import Node


def parameter_channel_dims(dg: Any) -> None:
    """The dimension that holds the channels of each loose parameter (one no layer owns), where torch-pruning's
    guess is wrong.

    torch-pruning cuts a loose parameter along its last dimension longer than 1: right for a transformer's
    positional embedding ``(1, tokens, C)``, wrong for one over feature maps ``(1, C, H, W)`` (Visformer's and
    PiT's), which lost columns instead of channels, so every probe of the stream failed. The parameter's channels
    are those of the tensors it is combined with: where exactly one of its dimensions is that wide, that is the
    one cut. Those tensors are found past the operations on the parameter alone: SAM 2's Hiera interpolates its
    ``(1, C, H, W)`` embedding, adds a tiled window embedding (another loose parameter, which says nothing of the
    width), flattens and transposes the sum, and only then adds it to the tokens.
    """
    from_params: dict[Any, bool] = {}
    for param, node in dg.module2node.items():
        if not isinstance(param, nn.Parameter) or param.dim() < 3 or node.pruning_dim is None:
            continue
        widths = _combined_widths(dg, node, from_params)
        dims = [d for d, size in enumerate(param.shape) if size > 1 and size in widths]
        if len(dims) == 1:
            node.pruning_dim = dims[0]


def _combined_widths(dg: Any, node: Node, from_params: dict[Any, bool], depth: int = 8) -> set[int]:
    """The channel counts of the tensors that ``node``'s value is first combined with, other than values computed
    from loose parameters alone, followed through at most ``depth`` operations on it alone."""
    widths: set[int] = set()
    frontier, seen = [node], {node}
    for _ in range(depth):
        following = []
        for current in frontier:
            for user in current.outputs:
                others = [o for o in user.inputs if o is not current and not _from_params(dg, o, from_params)]
                widths.update(w for o in others if (w := shape_infer.infer_out_channels_recursively(dg, o, [0])))
                if not others and user not in seen and not _is_layer(dg, user):
                    seen.add(user)
                    following.append(user)
        frontier = following
    return widths


def _is_layer(dg: Any, node: Node) -> bool:
    """Whether ``node`` is one of the model's modules (not an operation between them, not a loose parameter)."""
    return isinstance(node.module, nn.Module) and node.module in dg._module2name


def _from_params(dg: Any, node: Node, memo: dict[Any, bool]) -> bool:
    """Whether ``node``'s value is computed from loose parameters alone (no layer's output, no model input)."""
    if node not in memo:
        memo[node] = False  # while its inputs are looked at (the graph has no cycles; this ends any)
        memo[node] = isinstance(node.module, nn.Parameter) or (
            bool(node.inputs) and not _is_layer(dg, node) and all(_from_params(dg, i, memo) for i in node.inputs)
        )
    return memo[node]
