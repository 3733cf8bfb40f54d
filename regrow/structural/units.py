"""Channel groups and head groups behind one interface, and removals applied, checked and probed with it.

The functions that compare outputs take the comparison as ``compare`` rather than importing it: the package
passes in the ``compare`` it holds, which is where tests replace it (``regrow.structural.compare``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from regrow.errors import RegrowError, first_line
from regrow.structural.graph import ChannelGroup, Cut, StructureGraph, apply_cuts
from regrow.structural.heads import HeadGroup
from regrow.structural.mlp import MlpGroup
from regrow.structural.simulate import Equivalence, simulate

Compare = Callable[[nn.Module, nn.Module, Any], Equivalence]  # (shrunk, simulated, inputs) -> Equivalence


class _Unit:
    """A channel group or a head group behind one interface: cut on a model, simulate on a copy."""

    def __init__(self, group: ChannelGroup | HeadGroup | MlpGroup, graph: StructureGraph | None) -> None:
        self.group = group
        self.graph = graph

    @property
    def name(self) -> str:
        return self.group.name

    def cuts(self, removed: list[int]) -> list[Cut]:
        if isinstance(self.group, ChannelGroup) and removed:
            assert self.graph is not None
            return self.graph.cuts(self.group, removed)
        return []

    @functools.cached_property
    def parts(self) -> tuple[tuple[int, ...], ...]:
        """The units of each layer that holds only some of the group's channels (StructureGraph.parts)."""
        if isinstance(self.group, ChannelGroup) and self.graph is not None:
            return self.graph.parts(self.group)
        return ()

    def heads(self, removed: list[int]) -> list[tuple[HeadGroup | MlpGroup, list[int]]]:
        """Groups that remove their own units (heads, FFN channels found without a graph)."""
        return [(self.group, removed)] if isinstance(self.group, (HeadGroup, MlpGroup)) and removed else []


def _apply(model: nn.Module, units: list[_Unit], removed: dict[str, list[int]]) -> None:
    """Shrink ``model`` in place: remove the given units (by index) of each group."""
    cuts = [c for u in units for c in u.cuts(removed.get(u.name, []))]
    apply_cuts(model, cuts)
    for u in units:
        for group, heads in u.heads(removed.get(u.name, [])):
            group.apply(model, heads)


def _check(
    model: nn.Module, units: list[_Unit], removed: dict[str, list[int]], inputs: Any, compare: Compare
) -> Equivalence:
    """Simulate on one copy, shrink another copy, compare."""
    cuts = [c for u in units for c in u.cuts(removed.get(u.name, []))]
    heads = [h for u in units for h in u.heads(removed.get(u.name, []))]
    simulated = simulate(model, cuts, heads)
    shrunk = copy.deepcopy(model)
    _apply(shrunk, units, removed)
    return compare(shrunk, simulated, inputs)


def _breaks_ties(model: nn.Module, unit: _Unit, ties: list[list[tuple[str, str]]]) -> str | None:
    """Why the group cannot be shrunk when removing one of its units changes only one side of a tied
    parameter (an embedding tied to the output layer whose two widths belong to different groups)."""
    if not ties:
        return None
    trial = copy.deepcopy(model)
    _apply(trial, [unit], {unit.name: [0]})
    for group in ties:
        shapes = {f"{m}.{p}": tuple(trial.get_submodule(m)._parameters[p].shape) for m, p in group}
        if len(set(shapes.values())) > 1:
            return f"it would untie {' from '.join(shapes)}, changing the shape of only one of them"
    return None


def _probe_removal(unit: _Unit) -> list[int]:
    """The units a probe removes: the first, the second and the last, never all of them, nor all of a part (a
    layer that reads one chunk of a split of the group's channels keeps some, as any selection leaves it). An
    odd index and both ends catch a mapping that is right for unit 0 only (a slice read as a slice of channels
    keeps even ones)."""
    n = unit.group.units
    removed: list[int] = []
    for u in [*dict.fromkeys((0, 1, n - 1)), *range(2, n - 1)]:
        if len(removed) == 3 or len(removed) == n - 1:
            break
        if all(set(part) - {*removed, u} for part in unit.parts if u in part):
            removed.append(u)
    return sorted(removed)


def _probe(model: nn.Module, units: list[_Unit], inputs: Any, compare: Compare) -> str | None:
    """Remove a few units of each group together on a copy; why that fails, or None when it works."""
    try:
        eq = _check(model, units, {u.name: _probe_removal(u) for u in units}, inputs, compare)
    except RegrowError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure means regrow cannot shrink this group correctly
        return f"shrinking it breaks the forward pass ({first_line(exc)})"
    if eq.shapes is not None:
        was, now = (tuple(shape) for shape in eq.shapes)
        return f"its channels are the model's output: shrinking them changes the output's shape from {was} to {now}"
    if not eq.passed:
        return f"the shrunk layers do not match their simulation (max difference {eq.max_abs_diff:.3g}{eq.where})"
    return None


def _probe_all(model: nn.Module, units: list[_Unit], inputs: Any, compare: Compare) -> dict[str, str]:
    """Why each group at fault cannot be shrunk: the groups are probed all together, and a set that fails is
    probed again in halves, down to single groups. When every group is fine (the common case) that is one
    check instead of one per group: a DenseNet-121 has 120 groups."""
    if not units:
        return {}
    reason = _probe(model, units, inputs, compare)
    if reason is None:
        return {}
    if len(units) == 1:
        return {units[0].name: reason}
    half = len(units) // 2
    return {**_probe_all(model, units[:half], inputs, compare), **_probe_all(model, units[half:], inputs, compare)}
