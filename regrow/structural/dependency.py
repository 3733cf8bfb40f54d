"""torch-pruning's dependency graph, with the widths it infers corrected from the shapes of the traced forward pass.

torch-pruning builds the graph from the autograd graph of one forward pass and infers, op by op, how many channels
each tensor has and which channels of a split or concatenation each neighbour holds; regrow reads these off the
shapes that the same pass recorded where torch-pruning guesses (regrow.structural.chunks), marks every output
the model returns, and corrects the channel dimension of loose parameters (regrow.structural.tracing).
"""

from __future__ import annotations

from typing import Any

import torch_pruning as tp
from torch import Tensor
from torch_pruning import ops
from torch_pruning.dependency import shape_infer
from torch_pruning.dependency.node import Node

from regrow.structural.chunks import (
    concats_past_channels,
    feature_map_mappings,
    fill_concat_sizes,
    fill_split_sizes,
    unbound_channels,
)
from regrow.structural.loose import parameter_channel_dims
from regrow.structural.tokens import pass_channels_around, stacked_mixers
from regrow.structural.tracing import mark_outputs


def concat_width(module_or_node: Any) -> int | None:
    """The channels of a concatenation along the last dimension whose input widths are all known (read off the
    traced shapes by :func:`regrow.structural.chunks.fill_concat_sizes`), None for any other op or layer. Along
    dim 1 of three dimensions the widths may be tokens (a ViT's class token concatenated before its patches) as
    well as channels (a Conv1d's): those are left to torch-pruning.

    torch-pruning counts none for a concatenation and adds up the counts of its inputs each time it asks, and it
    counts an input that is one chunk of a split as the whole tensor split: MambaOut's ``cat((passed, convolved),
    dim=-1)`` of 80 and 48 channels, two chunks of its first projection's 256, was 304 wide, so the reshape of the
    gated product before the output projection, ``(B, H, W, 128)`` into ``(B*H*W, 128)``, was mapped as a flatten
    of 304 channels into 128 and sent channel ``c`` to ``c // 2``."""
    module = module_or_node.module if isinstance(module_or_node, Node) else module_or_node
    if not isinstance(module, ops._ConcatOp) or not getattr(module, "channels_last", False):
        return None
    sizes = module.concat_sizes
    return sum(sizes) if sizes and all(isinstance(size, int) for size in sizes) else None


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's graph, with the split and concatenation widths read from the traced shapes before it maps
    indices through them (regrow.structural.chunks.fill_split_sizes, fill_concat_sizes), their mappings on where
    torch-pruning turned them off (feature_map_mappings), and the channel dimension of loose parameters over
    feature maps (parameter_channel_dims)."""

    def __init__(self, outputs: dict[tuple[Any, int], tuple[int, ...]], returned: list[Tensor]) -> None:
        super().__init__()
        self.traced_outputs = outputs  # filled by the tracing forward pass, which runs before _build_dependency
        self.returned = returned  # the tensors the model returned, filled by the same pass
        self.token_outputs: set[Any] = set()  # Linear layers whose outputs are a sequence's tokens (tokens.py)

    def get_out_channels(self, module_or_node: Any) -> int | None:
        """A concatenation's channels (torch-pruning's count none): see :func:`concat_width`."""
        return concat_width(module_or_node) or super().get_out_channels(module_or_node)

    def get_in_channels(self, module_or_node: Any) -> int | None:
        return concat_width(module_or_node) or super().get_in_channels(module_or_node)

    def _build_dependency(self, module2node: Any) -> None:
        self.token_outputs = pass_channels_around(self, self.traced_outputs) | stacked_mixers(self, self.traced_outputs)
        mark_outputs(module2node, self.returned[1:], self)
        self.returned = []  # the graph keeps their autograd nodes, not the tensors
        super()._build_dependency(module2node)
        shape_infer.init_shape_information(self)  # split sizes, which the inference of channel counts reads
        feature_map_mappings(self, self.traced_outputs)
        fill_split_sizes(self, self.traced_outputs)
        fill_concat_sizes(self, self.traced_outputs)
        concats_past_channels(self, self.traced_outputs)
        unbound_channels(self, self.traced_outputs)
        parameter_channel_dims(self)
        self.built = True

    def build_dependency(self, *args: Any, **kwargs: Any) -> DependencyGraph:
        self.built = False
        try:
            super().build_dependency(*args, **kwargs)
        except Exception:
            if not self.built:
                raise
            # Raised in torch-pruning's last step, its index mappings over the whole graph: regrow computes them
            # again op by op (refresh_mappings), and leaves out the groups that pass through an op that fails.
        # torch-pruning inferred the widths again after the above; StructureGraph then maps through them
        # (refresh_mappings)
        fill_split_sizes(self, self.traced_outputs)
        return self
