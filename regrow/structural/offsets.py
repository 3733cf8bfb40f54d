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

A group that lies wholly inside an attention module whose inner width is left out, which the attention's output
projection reads and none of its queries', keys' or values' projections does, is part of that width too
(:func:`enclosing_attention`).
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


def inside_attention(owner: str, unheaded: Mapping[str, str]) -> str:
    """Why a group inside attention ``owner`` is left out of channel pruning (``unheaded``: the attention modules
    whose heads pattern 'head' cannot remove, with why)."""
    if owner not in unheaded:
        return f"inside attention {owner!r}: its inner width shrinks only by whole heads (pattern 'head')"
    why = f"which pattern 'head' cannot remove here ({unheaded[owner]})"
    return f"inside attention {owner!r}: its inner width is split into heads, {why}"


def attention_reason(
    model: nn.Module,
    inner: Mapping[str, set[str]],
    unheaded: Mapping[str, str],
    outputs: Mapping[str, str],
    layers: tuple[list[str], list[str], list[str]],
) -> tuple[str | None, dict[nn.Module, tuple[int, tuple[int, ...]]] | None]:
    """Why a channel group is left out as part of an attention's inner width (None if it is not), and the
    chunks its heads shrink by where it shrinks by head offsets (:func:`offset_chunks`); ``layers``: the
    group's members, its output layers and the layers that read its channels (regrow.structural.graph)."""
    members, out_layers, in_layers = layers
    owners = [a for a, projections in inner.items() if any(n in projections for n in out_layers)]
    if owners:  # left to pattern 'head' unless it shrinks by head offsets
        chunks = offset_chunks(model, owners, inner, out_layers)
        return (inside_attention(owners[0], unheaded), None) if chunks is None else (None, chunks)
    owner = enclosing_attention(inner, outputs, members, in_layers)  # MViTv2's pooling: a channel of every head
    return (None if owner is None else inside_attention(owner, unheaded)), None


def enclosing_attention(
    inner: Mapping[str, set[str]], outputs: Mapping[str, str], members: Iterable[str], in_layers: Iterable[str]
) -> str | None:
    """The attention module (of ``inner``: each one's q / k / v projections, where its inner width is left out)
    that holds every member of a channel group (``members``: its layers and parameters), when its output projection
    (``outputs``: only where pattern 'head' found the attention's heads, so that it reads their outputs and nothing
    else) reads the group's channels and none of its q / k / v projections does (``in_layers``: the layers that
    read them); None otherwise. Such a group is a part of the attention's inner width that the trace could not tie
    to the projections: MViTv2 folds its heads into the batch and pools each head's queries, keys and values with
    one depthwise filter a channel of every head, normalises them per head and adds a relative position table as
    wide as a head, so the group of its pooling (with the output projection's inputs) is one channel of every head,
    which no probe could shrink alone ("shrinking it breaks the forward pass", 9 groups of mvitv2_tiny). Groups
    inside attention that the output projection does not read are not its width: CaiT's talking heads (one
    channel a head, between the two layers that mix them), the map PVT v2 reduces for its keys and values (read
    by their projection)."""
    names, read = set(members), set(in_layers)
    for owner, projections in inner.items():
        if not projections or outputs.get(owner) not in read or projections & read:
            continue
        if names and all(n.startswith(f"{owner}." if owner else "") for n in names):
            return owner
    return None
