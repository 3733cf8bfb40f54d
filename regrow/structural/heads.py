"""Attention heads as prunable units.

Two kinds of attention module are understood:

* regrow's :class:`~regrow.structural.attention.MultiheadAttention` (every ``nn.MultiheadAttention`` is
  converted to it before structural pruning);
* a custom module that declares its head count (``num_heads``, ``num_attention_heads``, ``n_heads``, ``n_head``
  or ``heads``), or — Hugging Face's Llama family — an ``int`` ``head_dim`` and ``num_key_value_groups`` (the
  head count is then the query width over ``head_dim``; GPT-NeoX: ``head_size`` and a fused ``query_key_value``),
  and owns its projections as ``nn.Linear`` (or Hugging Face ``Conv1D``, GPT-2) children: a fused ``qkv`` (also
  ``in_proj``, ``c_attn``, ``Wqkv``, ``qkv_proj``, ``to_qkv``, ``query_key_value``) or separate ``q``/``k``/``v``
  (also ``q_proj``..., ``query``/``key``/``value``, ``wq``..., ``q_lin``..., ``query_proj``...) or ``q`` with a
  fused ``kv`` (timm's PVT v2 and Twins), and an output projection (``proj``, ``out_proj``, ``o_proj``, ``o``,
  ``out``, ``wo``, ``c_proj``, ``out_lin``, ``dense``, ``merge``), or — the Hugging Face BERT layout —
  ``output.dense`` of its parent. Of nested modules that declare heads, only the innermost counts (``find_attention``).
  Removing a head slices those layers and lowers the head count; any other integer attribute equal to the old
  inner width (e.g. ``all_head_size``) is updated too, and so are per-head tensors of the module
  (``regrow.structural.position_bias``: Swin's relative position bias table, Swin V2's logit scale and the last layer
  of its position-bias MLP, TinyViT's attention biases, whose eval-mode cache is emptied, timm's relative position
  bias modules, XCiT's temperature) and the q / k / v biases it
  holds beside a fused projection (``LOOSE_BIASES``: timm's BEiT, EVA and Swin V2). A fused ``qkv`` holds all
  queries, then all keys, then all values; or each head's q, k and v rows together (``INTERLEAVED``: Hugging Face's
  GPT-NeoX and GPTBigCode). timm's LeViT, EfficientFormer and TinyViT hold each head's rows together in sections of
  widths they name, values wider than keys, behind a BatchNorm in LeViT (``SECTIONED``, :class:`SectionedHeads`);
  timm's multi-query attention over 2D maps (``MULTI_QUERY``: MobileNetV4 hybrids, MobileNetV5) has 1x1
  convolutions as projections and one key and one value head that every query head reads, which stay whole.

With grouped-query attention (k and v narrower than q: each key/value head serves ``kv_group`` query heads)
the unit removed is a key/value head together with its query heads, so the grouping stays as the module
computes it (``num_key_value_groups`` unchanged). With one key/value head for all (multi-query: Gemma 1's 2B,
StarCoder, Falcon-7B) a unit is one query head, and the key/value head stays whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from regrow.select import is_transposed_linear
from regrow.structural.attention import MultiheadAttention, keep_index
from regrow.structural.graph import HEAD_ATTRS, KV_ATTRS, head_count
from regrow.structural.layer_config import bind
from regrow.structural.position_bias import keep_per_head
from regrow.structural.pruners import keep_columns, keep_rows, linear_weight

FUSED = ("qkv", "in_proj", "c_attn", "Wqkv", "qkv_proj", "to_qkv", "query_key_value")
SEPARATE = (
    ("q", "k", "v"),
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("wq", "wk", "wv"),
    ("q_lin", "k_lin", "v_lin"),
    ("query_proj", "key_proj", "value_proj"),
)
SEPARATE_KV = (("q", "kv"),)  # a query projection and a fused key / value one (timm's PVT v2, Twins)
OUTPUT = ("proj", "out_proj", "o_proj", "o", "out", "wo", "c_proj", "out_lin", "dense", "merge")
# Attention whose fused qkv holds each head's q, k and v rows together (``qkv.view(B, N, heads, -1).split(...)``),
# not all queries, then all keys, then all values: Hugging Face's GPT-NeoX (``view(B, N, -1, 3 * d)``
# then ``chunk(3, -1)``, and GPT-NeoX-Japanese) and GPTBigCode without multi_query, by module and class name.
INTERLEAVED = {
    "transformers.models.gpt_neox.modeling_gpt_neox.GPTNeoXAttention",
    "transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese.GPTNeoXJapaneseAttention",
    "transformers.models.gpt_bigcode.modeling_gpt_bigcode.GPTBigCodeAttention",  # without multi_query
}
# ... and those that do where a flag of theirs says so: timm's MaxViT and CoAtNet (``head_first``, the default)
INTERLEAVED_IF = {"timm.models.maxxvit.AttentionCl": "head_first", "timm.models.maxxvit.Attention2d": "head_first"}
# Biases of the attention's own beside a fused projection without one (timm's BEiT, EVA and Swin V2 add them in
# F.linear; the key's is a zero buffer): one value per row of q, k or v.
LOOSE_BIASES = ("q_bias", "k_bias", "v_bias")
# Attention whose projections hold each head's rows together in sections of unequal widths, which the module names
# by attributes: queries and keys key_dim wide, values val_dim (``qkv(x).view(B, N, heads, -1).split([key_dim, key_dim,
# val_dim])``): timm's LeViT (its projections a Linear or 1x1 convolution with a BatchNorm after it, its downsampling
# attention a query projection beside a fused key / value one), EfficientFormer and TinyViT. Per class: each
# projection's child name and sections, then the integer attributes that are a section's width times the head count.
SECTIONED = {
    "timm.models.levit.Attention": (
        {"qkv": ("key_dim", "key_dim", "val_dim")},
        {"key_attn_dim": "key_dim", "val_attn_dim": "val_dim"},
    ),
    "timm.models.levit.AttentionDownsample": (
        {"q": ("key_dim",), "kv": ("key_dim", "val_dim")},
        {"key_attn_dim": "key_dim", "val_attn_dim": "val_dim"},
    ),
    "timm.models.efficientformer.Attention": (
        {"qkv": ("key_dim", "key_dim", "val_dim")},
        {"key_attn_dim": "key_dim", "val_attn_dim": "val_dim"},
    ),
    "timm.models.tiny_vit.Attention": ({"qkv": ("key_dim", "key_dim", "val_dim")}, {"out_dim": "val_dim"}),
}
# Multi-query attention whose query heads (``num_heads`` of ``key_dim`` rows) all read one key and one value head
# (``value_dim`` wide): per class, the paths of its query, key, value and output projections.
MULTI_QUERY = {
    "timm.layers.attention2d.MultiQueryAttention2d": ("query.proj", "key.proj", "value.proj", "output.proj"),
}


@dataclass
class HeadGroup:
    """The heads of one attention module. With grouped-query attention (``kv_group`` query heads share one
    key/value head) a unit is one key/value head with its query heads, so the sharing stays intact."""

    name: str
    heads: int
    head_dim: int
    projections: dict[str, str]  # role -> child name: "q"/"k"/"v", "qkv" or "q"/"kv", and "out"
    excluded: str | None = None
    kv_group: int = 1  # query heads per key/value head
    q_rows: int = 1  # rows of q per head, in head sizes: 2 where each head's query has a gate beside it
    interleaved: bool = False  # a fused qkv with each head's q, k and v rows together (INTERLEAVED)

    @property
    def units(self) -> int:
        return self.heads // self.kv_group

    @property
    def members(self) -> list[str]:
        return list(self.projections.values())

    @property
    def kv_heads(self) -> int:
        """Key / value heads: one per unit."""
        return self.units

    def _child(self, model: nn.Module, role: str) -> nn.Module:
        return model.get_submodule(self.projections[role])

    def _query_heads(self, removed: list[int]) -> list[int]:
        """The query heads of the removed units."""
        return [u * self.kv_group + i for u in removed for i in range(self.kv_group)]

    def scores(self, model: nn.Module, use_grad: bool) -> Tensor:
        """Per unit: sum over its q/k/v rows and output columns of w^2 (magnitude) or |w * dw/dL| (taylor)."""
        stat = functools.partial(_stat, use_grad=use_grad)
        per_query = torch.zeros(self.heads)
        per_unit = torch.zeros(self.units)
        if self.interleaved:  # each head's q, k and v rows together
            per_query += stat(self._child(model, "qkv")).view(self.heads, -1).sum(dim=1)
        elif "qkv" in self.projections:  # the rows of q, then k's, then v's (k and v narrower with grouped queries)
            w = stat(self._child(model, "qkv"))
            inner = self.heads * self.head_dim
            per_query += w[:inner].reshape(self.heads, -1).sum(dim=1)
            per_unit += w[inner:].reshape(2, self.units, -1).sum(dim=(0, 2))
        elif "kv" in self.projections:
            per_query += stat(self._child(model, "q")).view(self.heads, -1).sum(dim=1)
            per_unit += stat(self._child(model, "kv")).view(2, self.units, self.head_dim, -1).sum(dim=(0, 2, 3))
        else:
            per_query += stat(self._child(model, "q")).view(self.heads, -1).sum(dim=1)
            for role in ("k", "v"):
                per_unit += stat(self._child(model, role)).view(self.units, self.head_dim, -1).sum(dim=(1, 2))
        w = stat(self._child(model, "out"))
        if getattr(model.get_submodule(self.name), "heads_last", False):  # column d * heads + h (NesT)
            per_query += w.view(w.shape[0], self.head_dim, self.heads).sum(dim=(0, 1))
        else:
            per_query += w.view(w.shape[0], self.heads, self.head_dim).sum(dim=(0, 2))
        return per_query.view(self.units, self.kv_group).sum(dim=1) + per_unit

    @torch.no_grad()
    def apply(self, model: nn.Module, removed: list[int]) -> None:
        """Remove the ``removed`` units (heads; with grouped-query attention, key/value heads with their query
        heads) from the module of that name in ``model``."""
        if not removed:
            return
        module = model.get_submodule(self.name)
        if isinstance(module, MultiheadAttention):
            module.remove_heads(removed)
            return
        queries = self._query_heads(removed)
        old_inner, old_kv = self.heads * self.head_dim, self.units * self.head_dim
        if self.interleaved:
            qkv = self._child(model, "qkv")
            keep_rows(qkv, keep_index(self.heads, 3 * self.head_dim, queries, qkv.weight.device))
        elif "qkv" in self.projections:
            qkv = self._child(model, "qkv")
            q = keep_index(self.heads, self.head_dim, queries, qkv.weight.device)
            kv = keep_index(self.units, self.head_dim, removed, qkv.weight.device)
            keep_rows(qkv, torch.cat([q, kv + old_inner, kv + old_inner + old_kv]))
        else:
            q = self._child(model, "q")
            keep_rows(q, keep_index(self.heads, self.q_rows * self.head_dim, queries, q.weight.device))
            for role in ("k", "v", "kv"):
                if role in self.projections:
                    layer = self._child(model, role)
                    keep = keep_index(self.units, self.head_dim, removed, layer.weight.device)
                    sections = 2 if role == "kv" else 1
                    keep_rows(layer, torch.cat([keep + s * self.units * self.head_dim for s in range(sections)]))
        out = self._child(model, "out")
        keep = keep_index(self.heads, self.head_dim, queries, out.weight.device)
        if getattr(module, "heads_last", False):  # heads merged channel-major: column d * heads + h (NesT)
            kept = keep_index(self.heads, 1, queries, out.weight.device)
            keep_columns(out, (torch.arange(self.head_dim, device=kept.device)[:, None] * self.heads + kept).flatten())
        else:
            keep_columns(out, keep)
        keep_per_head(module, self.heads, queries)
        for tensor, store, key in _loose_biases(module, old_inner):
            kept = tensor.index_select(0, keep.to(tensor.device)).contiguous()
            store[key] = nn.Parameter(kept, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else kept
        for attr, value in list(vars(module).items()):
            if attr in HEAD_ATTRS and isinstance(value, int):
                setattr(module, attr, value - len(queries))
            elif attr in KV_ATTRS and isinstance(value, int):
                setattr(module, attr, value - len(removed))
            elif isinstance(value, int) and not isinstance(value, bool) and value == old_inner and _width(attr):
                setattr(module, attr, len(keep))
            elif isinstance(value, int) and not isinstance(value, bool) and value == old_kv and "kv" in attr:
                setattr(module, attr, old_kv - len(removed) * self.head_dim)  # keys' and values' width: kv_dim
        if isinstance(getattr(module, "attention_bias_cache", None), dict):
            module.attention_bias_cache = {}  # timm's TinyViT and LeViT keep their biases, per head, in eval mode
        counts = {a: (self.heads, self.heads - len(queries)) for a in HEAD_ATTRS}
        bind(module, counts | {a: (self.units, self.units - len(removed)) for a in KV_ATTRS})

    @torch.no_grad()
    def simulate(self, model: nn.Module, removed: list[int]) -> None:
        """Zero the value rows of the ``removed`` units, and the output projection's columns that read their heads:
        what they add to the output becomes exactly zero, as if removed (zeroed values alone leave a head's output
        nonzero where the attention adds its queries to it or normalises its values: MViTv2)."""
        if not removed:
            return
        out, queries = self._child(model, "out"), self._query_heads(removed)
        if getattr(model.get_submodule(self.name), "heads_last", False):  # column d * heads + h (NesT)
            columns = [d * self.heads + h for d in range(self.head_dim) for h in queries]
        else:
            columns = _rows_of(self.head_dim, queries)
        linear_weight(out)[:, columns] = 0
        if self.interleaved:  # each head's values follow its query and key rows
            layer, first = self._child(model, "qkv"), {h: (3 * h + 2) * self.head_dim for h in removed}
        else:
            if "qkv" in self.projections:  # the values' section, or the one the attention is applied to
                section = getattr(model.get_submodule(self.name), "value_section", 2)
                starts = (0, self.heads, self.heads + self.units)
                layer, offset = self._child(model, "qkv"), starts[section] * self.head_dim
            elif "kv" in self.projections:
                layer, offset = self._child(model, "kv"), self.units * self.head_dim
            else:
                layer, offset = self._child(model, "v"), 0
            first = {h: offset + h * self.head_dim for h in removed}
        weight = linear_weight(layer)  # a view: zeroing it zeroes the layer's weight
        module = model.get_submodule(self.name)
        loose = [t for t, _, key in _loose_biases(module, self.heads * self.head_dim) if key == "v_bias"]
        for h, start in first.items():
            rows = slice(start, start + self.head_dim)
            weight[rows] = 0
            if layer.bias is not None:
                layer.bias[rows] = 0
            for bias in loose:
                bias[h * self.head_dim : (h + 1) * self.head_dim] = 0


@dataclass
class SectionedHeads(HeadGroup):
    """The heads of an attention in ``SECTIONED``: each projection holds every head's rows together, in sections of
    the widths ``sections`` names (the last section of the one that ends in values: the values), and may have a
    BatchNorm right after it (``norms``). ``head_dim`` is a head's value width: the output projection's columns.
    With multi-query attention (``MULTI_QUERY``) no projection holds values per head (``values`` is None): the key
    and value projections every head reads (``shared``) stay whole."""

    sections: dict[str, tuple[int, ...]] = field(default_factory=dict)  # role -> one head's rows, section by section
    norms: dict[str, str] = field(default_factory=dict)  # role -> the norm over that projection's outputs
    widths: dict[str, int] = field(default_factory=dict)  # the module's attribute -> its width per head
    values: str | None = "qkv"  # the projection whose last section holds the values
    shared: tuple[str, ...] = ()  # the key and value projections all heads read (multi-query), never sliced

    @property
    def members(self) -> list[str]:
        return [*self.projections.values(), *self.shared]

    @property
    def kv_heads(self) -> int:
        """One key / value head per head, or (multi-query: no values per head) the one they all read."""
        return 1 if self.values is None else self.units

    def scores(self, model: nn.Module, use_grad: bool) -> Tensor:
        """Per head: the sum of w^2 (magnitude) or |w * dw/dL| (taylor) over its rows and output columns."""
        per_head = torch.zeros(self.heads)
        for role in self.sections:
            rows = _stat(self._child(model, role), use_grad)[: self.heads * sum(self.sections[role])]  # not k, v after
            per_head += rows.reshape(self.heads, -1).sum(dim=1)
        w = _stat(self._child(model, "out"), use_grad)
        return per_head + w.reshape(w.shape[0], self.heads, self.head_dim, -1).sum(dim=(0, 2, 3))

    @torch.no_grad()
    def apply(self, model: nn.Module, removed: list[int]) -> None:
        """Remove the ``removed`` heads: their rows, norm channels, output columns and per-head tensors."""
        if not removed:
            return
        for role, sections in self.sections.items():
            gone = _rows_of(sum(sections), removed)
            _prune(self._child(model, role), gone, outputs=True)
            if role in self.norms:
                tp.prune_batchnorm_out_channels(model.get_submodule(self.norms[role]), gone)
        _prune(self._child(model, "out"), _rows_of(self.head_dim, removed), outputs=False)
        module = model.get_submodule(self.name)
        keep_per_head(module, self.heads, removed)
        left = self.heads - len(removed)
        for attr, width in self.widths.items():
            setattr(module, attr, left * width)
        for attr in HEAD_ATTRS:
            if type(vars(module).get(attr)) is int:
                setattr(module, attr, left)
        if isinstance(getattr(module, "attention_bias_cache", None), dict):
            module.attention_bias_cache = {}  # the per-head position biases, cached in eval mode
        bind(module, {a: (self.heads, left) for a in HEAD_ATTRS})  # a Hugging Face module's own config

    @torch.no_grad()
    def simulate(self, model: nn.Module, removed: list[int]) -> None:
        """Zero the value rows of the ``removed`` heads, and their norm's scale and shift, and the output
        projection's columns that read them (all there is without values of their own: multi-query)."""
        linear_weight(self._child(model, "out"))[:, _rows_of(self.head_dim, removed)] = 0
        if self.values is None:
            return
        layer, per = self._child(model, self.values), sum(self.sections[self.values])
        norm = model.get_submodule(self.norms[self.values]) if self.values in self.norms else None
        for h in removed:
            rows = slice((h + 1) * per - self.head_dim, (h + 1) * per)
            layer.weight[rows] = 0
            for t in (layer.bias, *((norm.weight, norm.bias) if norm is not None else ())):
                if t is not None:
                    t[rows] = 0


def _rows_of(width: int, removed: list[int]) -> list[int]:
    """The rows (or columns) of the ``removed`` heads, each ``width`` wide, in order."""
    return [h * width + j for h in sorted(removed) for j in range(width)]


def _prune(layer: nn.Module, gone: list[int], outputs: bool) -> None:
    """Remove a Linear's or convolution's outputs or inputs ``gone`` (torch-pruning's functions)."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        (tp.prune_conv_out_channels if outputs else tp.prune_conv_in_channels)(layer, gone)
    else:
        (tp.prune_linear_out_channels if outputs else tp.prune_linear_in_channels)(layer, gone)


def _stat(layer: nn.Module, use_grad: bool) -> Tensor:
    """A layer's w^2 (magnitude) or |w * dw/dL| (taylor), as (outputs, inputs[, kernel])."""
    w = linear_weight(layer)
    if use_grad:
        g = layer.weight.grad
        if g is None:
            return torch.zeros_like(w)
        return (w.detach() * (g.t() if is_transposed_linear(layer) else g)).abs().float().cpu()
    return w.detach().pow(2).float().cpu()


def _sectioned(name: str, module: nn.Module, layout: dict[str, tuple[str, ...]], per_head: dict[str, str]) -> HeadGroup:
    """The :class:`SectionedHeads` of an attention in ``SECTIONED``, or why its heads cannot go."""
    heads = head_count(module) or 0
    sections = {role: tuple(int(getattr(module, a)) for a in attrs) for role, attrs in layout.items()}
    values = next(role for role, attrs in layout.items() if attrs[-1] == "val_dim")
    value_dim = sections[values][-1]
    projections, norms = {}, {}
    for role in (*sections, "out"):
        child = "proj" if role == "out" else role
        found = _layer_and_norm(child, getattr(module, child, None))
        if found is None:
            reason = f"its {role!r} is not one Linear or ungrouped convolution"
            return HeadGroup(name, heads, 0, projections, excluded=reason)
        layer, norm = found
        found_layer = module.get_submodule(layer)  # a Linear or an ungrouped convolution: its weight's rows and columns
        width = _in_features(found_layer) if role == "out" else _out_features(found_layer)
        wanted = heads * (value_dim if role == "out" else sum(sections[role]))
        if width != wanted:
            reason = f"its {role!r} projection is {width} wide, not {heads} heads of {wanted // max(heads, 1)}"
            return HeadGroup(name, heads, 0, projections, excluded=reason)
        projections[role] = f"{name}.{layer}" if name else layer
        if norm is not None and role != "out":
            norms[role] = f"{name}.{norm}" if name else norm
    widths = {attr: int(getattr(module, src)) for attr, src in per_head.items() if hasattr(module, attr)}
    return SectionedHeads(
        name, heads, value_dim, projections, sections=sections, norms=norms, widths=widths, values=values
    )


def _one_key_value_head(
    name: str, module: nn.Module, projections: dict[str, str], heads: int, head_dim: int
) -> HeadGroup:
    """Multi-query attention as :class:`SectionedHeads`: a head is its query's rows and the output projection's
    columns; the one key / value head all heads read stays whole, in projections of its own or in a fused one's rows
    after all queries'. The module's integers that are the inner width, or the query heads per key / value head,
    follow the heads."""
    shared = tuple(projections.pop(role) for role in ("k", "v", "kv") if role in projections)
    ints = {a: v for a, v in vars(module).items() if type(v) is int}
    widths = {a: head_dim for a, v in ints.items() if v == heads * head_dim and _width(a)}
    widths |= {a: 1 for a in ("num_key_value_groups",) if a in ints}
    sections = {"qkv" if "qkv" in projections else "q": (head_dim,)}
    return SectionedHeads(
        name, heads, head_dim, projections, sections=sections, values=None, shared=shared, widths=widths
    )


def _multi_query(name: str, module: nn.Module, paths: tuple[str, str, str, str]) -> HeadGroup:
    """The :class:`SectionedHeads` of a multi-query attention in ``MULTI_QUERY``, or why its heads cannot go: a head
    is its query's ``key_dim`` rows and the output projection's ``value_dim`` columns that read it."""
    heads, key_dim, value_dim = head_count(module) or 0, getattr(module, "key_dim", 0), getattr(module, "value_dim", 0)
    below = dict(module.named_modules())
    layers = {role: below.get(path) for role, path in zip(("q", "k", "v", "out"), paths, strict=True)}
    projections = {role: f"{name}.{path}" if name else path for role, path in zip(layers, paths, strict=True)}
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    if not all(isinstance(m, kinds) and getattr(m, "groups", 1) == 1 for m in layers.values()):
        reason = "its query, key, value and output projections are not each one Linear or ungrouped convolution"
        return HeadGroup(name, heads, 0, {}, excluded=reason)
    widths = (_out_features(layers["q"]), _in_features(layers["out"]))
    if not heads or widths != (heads * key_dim, heads * value_dim):
        reason = f"its query and output projections ({widths[0]}, {widths[1]} wide) do not hold {heads} heads"
        return HeadGroup(name, heads, 0, {}, excluded=f"{reason} of {key_dim} and {value_dim}")
    shared = (projections.pop("k"), projections.pop("v"))
    return SectionedHeads(name, heads, value_dim, projections, sections={"q": (key_dim,)}, values=None, shared=shared)


def _layer_and_norm(prefix: str, child: nn.Module | None) -> tuple[str, str | None] | None:
    """The one Linear or convolution in ``child`` (the attention's child ``prefix``), and the affine BatchNorm over
    its outputs where one follows it (timm's LeViT: ``LinearNorm``, ``ConvNorm``), by their paths from the
    attention; None where it holds not just one layer, a grouped convolution or another norm."""
    if not isinstance(child, nn.Module):
        return None
    layers = [(n, m) for n, m in child.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    norms = [(n, m) for n, m in child.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if len(layers) != 1 or getattr(layers[0][1], "groups", 1) != 1:
        return None
    path, width = layers[0][0], _out_features(layers[0][1])
    norm = next((n for n, m in norms if m.num_features == width and m.affine), None)
    if len(norms) > (norm is not None):
        return None
    return ".".join(filter(None, (prefix, path))), (f"{prefix}.{norm}" if norm is not None else None)


def _loose_biases(module: nn.Module, width: int) -> list[tuple[Tensor, dict[str, Tensor | None], str]]:
    """The module's ``LOOSE_BIASES`` one value per row of its ``width``-wide q, k or v: (tensor, the parameter or
    buffer dict that holds it, its name)."""
    found = []
    for key in LOOSE_BIASES:
        for store in (module._parameters, module._buffers):
            tensor = store.get(key)
            if tensor is not None and tensor.dim() == 1 and tensor.numel() == width:
                found.append((tensor, store, key))
    return found


def _width(attr: str) -> bool:
    """Whether an integer attribute equal to the inner width may be that width (``all_head_size``, GPT-2's
    ``split_size``), not a number that happens to be equal (a sliding window, a position count, an index)."""
    return attr != "head_dim" and not any(w in attr for w in ("window", "position", "max", "idx", "vocab"))


def _out_features(layer: nn.Module) -> int:
    return linear_weight(layer).shape[0]


def _in_features(layer: nn.Module) -> int:
    return linear_weight(layer).shape[1]


def head_group(name: str, module: nn.Module, model: nn.Module | None = None) -> HeadGroup:
    """Describe the heads of ``module`` (named ``name`` in ``model``), or say why regrow cannot prune them.

    The output projection is a child of the module, or — Hugging Face BERT layout — ``output.dense`` of the
    module's parent (``BertAttention.self`` computes the heads, ``BertAttention.output.dense`` mixes them).
    """

    def full(child: str) -> str:
        return f"{name}.{child}" if name else child

    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if kind in SECTIONED:
        return _sectioned(name, module, *SECTIONED[kind])
    if kind in MULTI_QUERY:
        return _multi_query(name, module, MULTI_QUERY[kind])
    if isinstance(module, MultiheadAttention):
        roles = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
        return HeadGroup(name, module.num_heads, module.head_dim, {r: full(c) for r, c in roles.items()})
    declared = head_count(module)
    paths = _projection_paths(module)
    children = {n: module.get_submodule(path) for n, path in paths.items()}
    projections: dict[str, str] = {}
    fused = next((n for n in FUSED if n in children), None)
    if fused is not None:
        projections["qkv"] = full(paths[fused])
        inner = kv_inner = _out_features(children[fused]) // 3  # narrower k and v: read below from the output
    elif (pair := next((p for p in SEPARATE_KV if all(n in children for n in p)), None)) is not None:
        projections.update({role: full(paths[n]) for role, n in zip(("q", "kv"), pair, strict=True)})
        inner, kv_inner = _out_features(children[pair[0]]), _out_features(children[pair[1]]) // 2
    else:
        names = next((trio for trio in SEPARATE if all(n in children for n in trio)), None)
        if names is None:
            return HeadGroup(name, declared or 0, 0, {}, excluded="no q/k/v or fused qkv Linear projections found")
        projections.update({role: full(paths[n]) for role, n in zip(("q", "k", "v"), names, strict=True)})
        inner, kv_inner, v_inner = (_out_features(children[n]) for n in names)
        if kv_inner != v_inner:
            return HeadGroup(name, declared or 0, 0, projections, excluded="k and v have different widths")
    head_dim = getattr(module, "head_dim", getattr(module, "head_size", None))  # GPT-NeoX's name
    head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 else None
    out_name = _output_projection(name, paths, model)
    if out_name is None:
        return HeadGroup(name, declared or 0, 0, projections, excluded="no output projection Linear found")
    projections["out"] = out_name
    prefix = f"{name}." if name else ""
    inside = out_name[len(prefix) :] if out_name.startswith(prefix) else None
    out_layer = module.get_submodule(inside) if inside in paths.values() else model.get_submodule(out_name)
    q_rows = 1
    kv_declared = next((getattr(module, a) for a in KV_ATTRS if type(getattr(module, a, None)) is int), None)
    if fused is not None and kv_declared and _in_features(out_layer) != inner:  # q, narrower k, v (Phi-3's qkv_proj)
        inner, rest = _in_features(out_layer), _out_features(children[fused]) - _in_features(out_layer)
        if rest <= 0 or rest % (2 * kv_declared):
            reason = f"its fused q/k/v projection ({inner + rest} wide) does not hold q as wide as the output's input "
            return HeadGroup(name, declared or 0, 0, projections, excluded=f"{reason}({inner}) and k, v of one width")
        kv_inner = rest // 2
    if fused is None and head_dim and inner == 2 * _in_features(out_layer) and inner % (2 * head_dim) == 0:
        q_rows, inner = 2, inner // 2  # each head's query with a gate beside it (Qwen3-Next, Qwen3.5)
    heads = declared or (inner // head_dim if head_dim else 0)
    if fused is not None and _in_features(out_layer) != inner:  # values wider than keys (TinyViT's attn_ratio)
        width, reason = _out_features(children[fused]), f"its output projection reads {_in_features(out_layer)}"
        return HeadGroup(name, heads, 0, projections, excluded=f"{reason}, not a third of its fused qkv ({width})")
    if not heads or inner % heads or _in_features(out_layer) != inner:
        return HeadGroup(name, heads, 0, projections, excluded=f"inner width {inner} does not fit {heads} heads")
    head_dim = inner // heads
    across = _norm_across_heads(module, paths, (inner, kv_inner), head_dim)
    if across is not None:
        reason = f"its norm {across!r} normalises {_normalised(across)} of all heads together: removing heads would "
        return HeadGroup(name, heads, head_dim, projections, excluded=f"{reason}change how the others are normalised")
    kv_heads = kv_inner // head_dim
    if fused is not None and kv_declared not in (None, kv_heads) and not kv_inner % head_dim:
        reason = f"it declares {kv_declared} key/value heads, but its fused q/k/v projection holds {kv_heads}"
        return HeadGroup(name, heads, head_dim, projections, excluded=reason)
    if kv_inner % head_dim or not kv_heads or heads % kv_heads:
        reason = f"{heads} query heads cannot share {kv_inner / head_dim:g} key/value heads evenly"
        return HeadGroup(name, heads, head_dim, projections, excluded=reason)
    if kv_heads == 1 < heads and q_rows == 1:  # multi-query (Gemma 1's 2B, StarCoder, Falcon-7B)
        return _one_key_value_head(name, module, projections, heads, head_dim)
    group = HeadGroup(name, heads, head_dim, projections, kv_group=heads // kv_heads, q_rows=q_rows)
    layout = kind in INTERLEAVED or getattr(module, INTERLEAVED_IF.get(kind, ""), None) is True
    group.interleaved = fused is not None and kv_heads == heads and layout  # a key per query head
    return group


def _projection_paths(module: nn.Module) -> dict[str, str]:
    """The attention's Linear (or Hugging Face ``Conv1D``) children by name, with their paths below it: the child
    itself, or the one Linear inside a child that only wraps it (no parameters of its own or in another child:
    timm's ``Gemma4ClippableLinear``, a Linear between optional clamps)."""
    paths = {}
    for n, child in module.named_children():
        if isinstance(child, nn.Linear) or is_transposed_linear(child):
            paths[n] = n
        elif not list(child.parameters(recurse=False)):
            held = [(c, m) for c, m in child.named_children() if list(m.parameters())]
            if len(held) == 1 and isinstance(held[0][1], nn.Linear):
                paths[n] = f"{n}.{held[0][0]}"
    return paths


QK_WORDS = {"q", "k", "qk", "query", "key", "queries", "keys", "qnorm", "knorm"}
REDUCTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d)
REDUCTIONS += (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _norm_across_heads(module: nn.Module, paths: dict[str, str], widths: tuple[int, ...], head_dim: int) -> str | None:
    """A norm child of the attention whose weight spans a projection's whole width, several heads, not one head's
    (Qwen3's, Gemma 3's): OLMo2's ``q_norm`` and ``k_norm`` before the view into heads, timm's ``scale_norm`` and
    BitNet's ``attn_sub_norm`` over all heads' outputs. A norm registered before the projections normalises the
    attention's input (TinyViT's ``norm``, as wide as its queries), and one registered right after a convolution
    or pooling that is not a projection normalises its output, the input reduced for the keys and values (PVT
    v2's, Twins' and Next-ViT's ``sr`` then ``norm``): any head may go past either."""
    children = list(module.named_children())
    first = next((k for k, (n, _) in enumerate(children) if n in paths), len(children))
    for k, (n, child) in enumerate(children[first:], first):
        weight = getattr(child, "weight", None)
        if n in paths or "norm" not in f"{n} {type(child).__name__}".lower() or not isinstance(weight, Tensor):
            continue
        if children[k - 1][0] not in paths and isinstance(children[k - 1][1], REDUCTIONS):
            continue
        if weight.dim() == 1 and weight.numel() in widths and weight.numel() != head_dim:
            return n
    return None


def _normalised(norm: str) -> str:
    """What a norm across heads normalises, by its name."""
    return "the queries or keys" if QK_WORDS & set(norm.lower().split("_")) else "the outputs"


def _output_projection(name: str, paths: dict[str, str], model: nn.Module | None) -> str | None:
    """The output projection: a child of the attention module (``paths``: :func:`_projection_paths`), or —
    Hugging Face BERT layout — ``output.dense`` of its parent."""
    full = f"{name}." if name else ""
    out_name = next((full + paths[n] for n in OUTPUT if n in paths), None)
    if out_name is None and model is not None and "." in name:
        sibling = f"{name.rpartition('.')[0]}.output.dense"
        try:
            if isinstance(model.get_submodule(sibling), nn.Linear):
                out_name = sibling
        except AttributeError:
            pass
    return out_name
