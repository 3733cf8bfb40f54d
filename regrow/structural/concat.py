"""Concatenations along the channels whose input widths torch-pruning did not work out.

torch-pruning reads the widths a concatenation joins from the layers around it, and checks them against the width
its consumers read. Where a consumer reads a slice of the result (timm's DPN: each block reads the concatenation
of the block before it as ``x[:, :c]`` and ``x[:, c:]``), that check failed, the concatenation got no mapping at
all, and each input's channel ``i`` was read as channel ``i`` of the result: a block's residual channels were tied
to its dense channels of the same index, and every probe of those groups failed. :func:`concat_widths` gives such
a concatenation the offsets of the widths the trace recorded, where a convolution or a batch norm reads the result:
dim 1 is then its channels, not tokens (``cat([cls_token, x], dim=1)``) or the rows of a channels-last map.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

from torch_pruning import ops
from torch_pruning.dependency import index_mapping

# Operations that read dim 1 of their input as its channels, module or function (timm's BatchNormAct2d calls
# F.batch_norm): a convolution, a batch norm
READS_CHANNELS = {"ConvolutionBackward0", "NativeBatchNormBackward0", "CudnnBatchNormBackward0"}


def concat_widths(dg: Any) -> None:
    """Map each concatenation along dim 1 that torch-pruning left without offsets by the widths the trace recorded
    (regrow.structural.chunks.fill_concat_sizes), where a convolution or batch norm reads the result and every
    input is a distinct node; any other stays as it was."""
    for node in dg.module2node.values():
        sizes = getattr(node.module, "concat_sizes", None)
        ours = getattr(node.module, "offsets_from_trace", False)  # mapped again at each refresh, as torch-pruning's
        if node.type != ops.OPTYPE.CONCAT or (node.module.offsets is not None and not ours) or not sizes:
            continue
        if getattr(node.module, "channels_last", True) or len(set(node.inputs)) != len(node.inputs):
            continue  # sizes not from the trace, or along the last dim; an input concatenated twice
        if not any(type(reader.grad_fn).__name__ in READS_CHANNELS for reader in node.outputs):
            continue
        offsets = [0, *accumulate(sizes)]
        node.module.offsets, node.module.offsets_from_trace = offsets, True
        for i, source in enumerate(node.inputs):
            span = offsets[i : i + 2]
            for dep in source.dependencies:  # into the concatenation: shifted by the input's offset
                if dep.target is node:
                    dep.index_mapping[1] = index_mapping._ConcatIndexMapping(offset=span, reverse=False)
            for dep in node.dependencies:  # back to the input: the indices within its span
                if dep.target is source:  # second, as torch-pruning puts it (update_mappings orders it after a split's)
                    dep.index_mapping[1] = index_mapping._ConcatIndexMapping(offset=span, reverse=True)
