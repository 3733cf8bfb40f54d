"""Transformer MLP (FFN) channels as prunable units, found from the module layout without a traced graph.

A transformer's FFN channels need no traced graph (whose analysis takes seconds to minutes on a large model):
they are the hidden width of one MLP module, whose input projections produce them and whose output projection
consumes them. Two layouts are recognised, by child names:

* gated (the Llama family): ``gate_proj`` and ``up_proj`` produce the channels, ``act(gate) * up`` combines
  them, ``down_proj`` consumes them;
* GPT-2's: ``c_fc`` produces them, an element-wise activation follows, ``c_proj`` consumes them.

Other layouts (``fc1`` / ``fc2`` in timm and in most hand-written models) go through the traced graph, which also
prunes the output projection's channels with everything coupled to them; here only the hidden width changes.

Projections are ``nn.Linear`` or Hugging Face ``Conv1D``. A removed channel is simulated by zeroing its row (and
bias) of the last input projection: ``up`` in ``act(gate) * up`` is then zero, and so is ``act(0)`` for GELU,
ReLU or SiLU; the equivalence check measures the rest (an activation with ``act(0) != 0`` fails it, named).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from regrow.select import is_transposed_linear
from regrow.structural.pruners import keep_columns, keep_rows, linear_weight

GATED = (("gate_proj", "up_proj", "down_proj"),)
PLAIN = (("c_fc", "c_proj"),)


@dataclass
class MlpGroup:
    """The hidden channels of one MLP module: ``inputs`` produce them (rows), ``output`` consumes them (columns)."""

    name: str
    channels: int
    inputs: list[str]
    output: str
    excluded: str | None = None
    unit_size: int = 1

    @property
    def units(self) -> int:
        return self.channels

    @property
    def members(self) -> list[str]:
        return [*self.inputs, self.output]

    def scores(self, model: nn.Module, use_grad: bool) -> Tensor:
        """Per channel: sum over its input rows and output column of w^2 (magnitude) or |w * dw/dL| (taylor)."""

        def stat(name: str) -> Tensor:
            layer = model.get_submodule(name)
            w = linear_weight(layer)
            if not use_grad:
                return w.detach().pow(2).float().cpu()
            g = layer.weight.grad
            if g is None:
                return torch.zeros(w.shape)
            return (w.detach() * (g.t() if is_transposed_linear(layer) else g)).abs().float().cpu()

        total = sum(stat(n).sum(dim=1) for n in self.inputs)
        return total + stat(self.output).sum(dim=0)

    @torch.no_grad()
    def apply(self, model: nn.Module, removed: list[int]) -> None:
        """Remove the ``removed`` channels from the module of that name in ``model``."""
        if not removed:
            return
        gone = set(removed)
        keep = torch.tensor([c for c in range(self.channels) if c not in gone], dtype=torch.long)
        for name in self.inputs:
            layer = model.get_submodule(name)
            keep_rows(layer, keep.to(layer.weight.device))
        out = model.get_submodule(self.output)
        keep_columns(out, keep.to(out.weight.device))
        module = model.get_submodule(self.name)
        for attr, value in list(vars(module).items()):  # e.g. LlamaMLP.intermediate_size
            if isinstance(value, int) and not isinstance(value, bool) and value == self.channels:
                setattr(module, attr, len(keep))

    @torch.no_grad()
    def simulate(self, model: nn.Module, removed: list[int]) -> None:
        """Zero the removed channels' rows (and biases) of the last input projection."""
        if not removed:
            return
        layer = model.get_submodule(self.inputs[-1])
        weight = linear_weight(layer)  # a view
        idx = torch.tensor(removed, dtype=torch.long, device=weight.device)
        weight.index_fill_(0, idx, 0.0)
        if layer.bias is not None:
            layer.bias.index_fill_(0, idx, 0.0)


def _linear_like(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or (module is not None and is_transposed_linear(module))


def find_mlps(model: nn.Module) -> dict[str, MlpGroup]:
    """Every MLP module of a recognised layout, with its channel group."""
    found = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        prefix = f"{name}." if name else ""
        for layout in (*GATED, *PLAIN):
            if all(_linear_like(children.get(c)) for c in layout):
                ins, out = list(layout[:-1]), layout[-1]
                widths = {linear_weight(children[c]).shape[0] for c in ins}
                if len(widths) == 1 and linear_weight(children[out]).shape[1] == next(iter(widths)):
                    found[name] = MlpGroup(name, widths.pop(), [prefix + c for c in ins], prefix + out)
                break
    return found


def mlp_groups(model: nn.Module, targets: list[str]) -> list[MlpGroup] | None:
    """The MLP groups that hold every target weight, when each target is a projection of a recognised MLP (then
    no traced graph is needed); None when some target lies elsewhere."""
    mlps = find_mlps(model)
    owner = {f"{p}.weight": g for g in mlps.values() for p in g.members}
    if not targets or any(t not in owner for t in targets):
        return None
    chosen = {owner[t].name: owner[t] for t in targets}
    return [chosen[n] for n in sorted(chosen)]
