"""Attention whose inner width is tied to the residual stream, shrunk by the same offsets in every head.

An attention's inner width (heads times head width) is left out of channel pruning: it shrinks by whole heads,
with pattern 'head'. Where the attention reads its queries from the stream itself (GCViT's global blocks: the
stage's global query, as wide as the stream), the inner width is the stream's, and leaving it out left the
whole stream out. An attention module that splits and merges its heads by the widths its tensors have (one of
regrow's stand-ins that says so, ``head_offsets = True``) can instead lose the same offsets in every head: its
fused projection's output is then cut at the same offsets in every head of each of its sections (queries,
keys, values: regrow.structural.coupling), so a unit of the stream is one channel of each head, with the keys'
channels at that offset (and the values', where the trace ties them to the output projection; where it does
not, the values stay). Its parameters with one value per head (``per_head_parameters``: a relative position
bias table) are no channel's and are never cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn


def per_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that hold one value per head of every attention module that names them (a stand-in that
    shrinks by head offsets, or EfficientViT's cascaded attention: regrow.structural.map_attention)."""
    return [m.get_parameter(name) for m in model.modules() for name in getattr(m, "per_head_parameters", ())]


def offset_chunks(
    model: nn.Module, owners: Iterable[str], inner: Mapping[str, set[str]], out_layers: Iterable[str]
) -> dict[nn.Module, tuple[int, tuple[int, ...]]] | None:
    """For a channel group whose output layers include the inner projections of the attention modules
    ``owners`` (``inner``: each one's projections): each such projection with its heads and the widths of its
    output's sections (queries, keys, values), where every owner shrinks by head offsets and the group holds
    other layers too (the stream its queries are read from). None otherwise: the group is inside attention and
    is left to pattern 'head'."""
    owners = list(owners)
    projections = {fqn for owner in owners for fqn in inner[owner]}
    if not set(out_layers) - projections:
        return None  # the attention's own width, not tied to a stream
    chunks: dict[nn.Module, tuple[int, tuple[int, ...]]] = {}
    for owner in owners:
        module = model.get_submodule(owner)
        if not getattr(module, "head_offsets", False):
            return None
        for name, sections in module.head_sections().items():
            chunks[module.get_submodule(name)] = (module.num_heads, sections)
    return chunks
