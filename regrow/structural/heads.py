"""Attention heads as prunable units.

Two kinds of attention module are understood:

* regrow's :class:`~regrow.structural.attention.MultiheadAttention` (every ``nn.MultiheadAttention`` is
  converted to it before structural pruning);
* a custom module that declares its head count (``num_heads``, ``num_attention_heads``, ``n_heads`` or
  ``n_head``) and owns its projections as ``nn.Linear`` children: a fused ``qkv`` (also ``in_proj``,
  ``c_attn``, ``Wqkv``) or separate ``q``/``k``/``v`` (also ``q_proj``..., ``query``/``key``/``value``,
  ``wq``..., ``q_lin``...), and an output projection (``proj``, ``out_proj``, ``o_proj``, ``o``, ``out``,
  ``wo``, ``c_proj``, ``out_lin``, ``dense``), or — the Hugging Face BERT layout — ``output.dense`` of its
  parent. Removing a head slices those layers and lowers the head count; any other integer attribute
  equal to the old inner width (e.g. ``all_head_size``) is updated too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from regrow.structural.attention import MultiheadAttention, keep_index
from regrow.structural.graph import HEAD_ATTRS

FUSED = ("qkv", "in_proj", "c_attn", "Wqkv", "qkv_proj")
SEPARATE = (
    ("q", "k", "v"),
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("wq", "wk", "wv"),
    ("q_lin", "k_lin", "v_lin"),
)
OUTPUT = ("proj", "out_proj", "o_proj", "o", "out", "wo", "c_proj", "out_lin", "dense")


@dataclass
class HeadGroup:
    """The heads of one attention module."""

    name: str
    heads: int
    head_dim: int
    projections: dict[str, str]  # role -> child name: "q"/"k"/"v" or "qkv", and "out"
    excluded: str | None = None

    @property
    def units(self) -> int:
        return self.heads

    @property
    def members(self) -> list[str]:
        return list(self.projections.values())

    def _child(self, model: nn.Module, role: str) -> nn.Linear:
        return model.get_submodule(self.projections[role])

    def _rows(self, removed: list[int], sections: int, device: torch.device) -> Tensor:
        keep = keep_index(self.heads, self.head_dim, removed, device)
        inner = self.heads * self.head_dim
        return torch.cat([keep + s * inner for s in range(sections)])

    def scores(self, model: nn.Module, use_grad: bool) -> Tensor:
        """Per head: sum over its q/k/v rows and output columns of w^2 (magnitude) or |w * dw/dL| (taylor)."""

        def stat(w: Tensor) -> Tensor:
            if use_grad:
                if w.grad is None:
                    return torch.zeros_like(w)
                return (w.detach() * w.grad).abs()
            return w.detach().pow(2)

        total = torch.zeros(self.heads)
        if "qkv" in self.projections:
            w = stat(self._child(model, "qkv").weight).float().cpu()
            total += w.view(3, self.heads, self.head_dim, -1).sum(dim=(0, 2, 3))
        else:
            for role in ("q", "k", "v"):
                w = stat(self._child(model, role).weight).float().cpu()
                total += w.view(self.heads, self.head_dim, -1).sum(dim=(1, 2))
        w = stat(self._child(model, "out").weight).float().cpu()
        total += w.view(w.shape[0], self.heads, self.head_dim).sum(dim=(0, 2))
        return total

    @torch.no_grad()
    def apply(self, model: nn.Module, removed: list[int]) -> None:
        """Remove ``removed`` heads from the module of that name in ``model``."""
        if not removed:
            return
        module = model.get_submodule(self.name)
        if isinstance(module, MultiheadAttention):
            module.remove_heads(removed)
            return
        old_inner = self.heads * self.head_dim
        if "qkv" in self.projections:
            qkv = self._child(model, "qkv")
            _keep_rows(qkv, self._rows(removed, 3, qkv.weight.device))
        else:
            for role in ("q", "k", "v"):
                layer = self._child(model, role)
                _keep_rows(layer, self._rows(removed, 1, layer.weight.device))
        out = self._child(model, "out")
        keep = self._rows(removed, 1, out.weight.device)
        out.weight = nn.Parameter(out.weight.index_select(1, keep).contiguous())
        out.in_features = len(keep)
        new_inner = len(keep)
        for attr, value in list(vars(module).items()):
            if attr in HEAD_ATTRS and isinstance(value, int):
                setattr(module, attr, value - len(removed))
            elif isinstance(value, int) and not isinstance(value, bool) and value == old_inner and attr != "head_dim":
                setattr(module, attr, new_inner)

    @torch.no_grad()
    def simulate(self, model: nn.Module, removed: list[int]) -> None:
        """Zero the value rows of ``removed`` heads: their output becomes exactly zero, as if removed."""
        if not removed:
            return
        inner = self.heads * self.head_dim
        if "qkv" in self.projections:
            layer, offset = self._child(model, "qkv"), 2 * inner
        else:
            layer, offset = self._child(model, "v"), 0
        for h in removed:
            rows = slice(offset + h * self.head_dim, offset + (h + 1) * self.head_dim)
            layer.weight[rows] = 0
            if layer.bias is not None:
                layer.bias[rows] = 0


def _keep_rows(layer: nn.Linear, keep: Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.index_select(0, keep).contiguous())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.index_select(0, keep).contiguous())
    layer.out_features = len(keep)


def head_group(name: str, module: nn.Module, model: nn.Module | None = None) -> HeadGroup:
    """Describe the heads of ``module`` (named ``name`` in ``model``), or say why regrow cannot prune them.

    The output projection is a child of the module, or — Hugging Face BERT layout — ``output.dense`` of the
    module's parent (``BertAttention.self`` computes the heads, ``BertAttention.output.dense`` mixes them).
    """

    def full(child: str) -> str:
        return f"{name}.{child}" if name else child

    if isinstance(module, MultiheadAttention):
        return HeadGroup(
            name,
            module.num_heads,
            module.head_dim,
            {"q": full("q_proj"), "k": full("k_proj"), "v": full("v_proj"), "out": full("out_proj")},
        )
    heads = next(getattr(module, a) for a in HEAD_ATTRS if isinstance(getattr(module, a, None), int))
    children = {n: m for n, m in module.named_children() if isinstance(m, nn.Linear)}
    projections: dict[str, str] = {}
    fused = next((n for n in FUSED if n in children), None)
    if fused is not None:
        projections["qkv"] = full(fused)
        inner = children[fused].out_features // 3
    else:
        names = next((trio for trio in SEPARATE if all(n in children for n in trio)), None)
        if names is None:
            return HeadGroup(name, heads, 0, {}, excluded="no q/k/v or fused qkv Linear projections found")
        projections.update({role: full(n) for role, n in zip(("q", "k", "v"), names, strict=True)})
        sizes = {children[n].out_features for n in names}
        if len(sizes) != 1:
            return HeadGroup(
                name, heads, 0, projections, excluded="q, k and v have different widths (grouped-query attention)"
            )
        inner = sizes.pop()
    out_name = next((full(n) for n in OUTPUT if n in children), None)
    if out_name is None and model is not None and "." in name:
        sibling = f"{name.rpartition('.')[0]}.output.dense"
        try:
            if isinstance(model.get_submodule(sibling), nn.Linear):
                out_name = sibling
        except AttributeError:
            pass
    if out_name is None:
        return HeadGroup(name, heads, 0, projections, excluded="no output projection Linear found")
    projections["out"] = out_name
    out_layer = (
        module.get_submodule(out_name[len(name) + 1 :])
        if out_name.startswith(name + ".")
        else model.get_submodule(out_name)
    )  # type: ignore[union-attr]
    if inner % heads or out_layer.in_features != inner:
        return HeadGroup(name, heads, 0, projections, excluded=f"inner width {inner} does not fit {heads} heads")
    return HeadGroup(name, heads, inner // heads, projections)
