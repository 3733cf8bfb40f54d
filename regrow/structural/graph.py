"""Coupled channel groups, found with torch-pruning's dependency graph, described in regrow's own terms.

A *channel group* is every tensor dimension that must shrink together when one layer loses output
channels: the layer itself, the BatchNorm after it, the other branch of a residual addition, the slice of
a concatenation, the input of every consumer, a LayerNorm over the same features, a positional embedding
added to them. torch-pruning (Fang et al. 2023, "DepGraph") finds the groups by tracing one forward pass;
regrow keeps its graph private and hands out :class:`Cut` lists that name every member by its
fully-qualified name, so the same cut can be applied to the model, to a copy, or simulated with masks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops

from regrow.batches import all_outputs
from regrow.errors import RegrowError
from regrow.select import is_transposed_linear
from regrow.structural.attention import MultiheadAttention
from regrow.structural.coupling import (
    Coupling,
    UnmappedOp,
    Walk,
    couple,
    in_torch_pruning,
    member_groups,
    near_widths,
    one_unit,
    pruning_group,
    remove_torch_pruning_hooks,
    walk,
)
from regrow.structural.dependency import DependencyGraph
from regrow.structural.marks import reading
from regrow.structural.offsets import attention_reason, inside_attention, per_head_parameters
from regrow.structural.position_bias import is_position_bias
from regrow.structural.pruners import GroupNormPruner, customized_pruners, is_channel_filter, is_plain_norm
from regrow.structural.shuffle import ChannelShuffle
from regrow.structural.stored import follow
from regrow.structural.tracing import InPlaceViews, ShapeRecorder, example_batch, refresh_mappings, update_mappings

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)  # convolutions, transposed ones (upsampling) too
TRANSPOSED_CONV = nn.modules.conv._ConvTransposeNd


def is_root(module: Any) -> bool:
    """A layer a channel group may start from: a convolution, a Linear or Hugging Face's Conv1D."""
    return isinstance(module, ROOT_TYPES) or (isinstance(module, nn.Module) and is_transposed_linear(module))


HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "kv_n_heads", "kv_heads")  # key/value head counts declared
# Modules whose channel handling regrow simulates exactly (see simulate.py).
SUPPORTED = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
    nn.Embedding,
    nn.LSTM,  # its inputs only (below)
    MultiheadAttention,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class Cut:
    """Remove ``idxs`` from one dimension of one layer or parameter.

    ``target`` is a module fqn (``kind="module"``; ``out`` says whether output or input channels go) or a
    parameter fqn (``kind="param"``, sliced along ``dim``).
    """

    target: str
    kind: str
    out: bool
    idxs: tuple[int, ...]
    dim: int = -1
    layer_type: str = ""


@dataclass
class ChannelGroup:
    """Coupled channels that are removed together, a unit at a time.

    A unit is the set of root channels that can only go together (regrow.structural.coupling): one channel,
    or, with a grouped convolution (``ch_groups``), the same channel of each of its groups, or channels tied
    by the graph itself (a GhostNet module's ``cat([x, depthwise(x)])``).
    """

    name: str
    channels: int
    ch_groups: int
    members: list[str]
    excluded: str | None = None
    root: Any = field(default=None, repr=False)
    root_handler: Any = field(default=None, repr=False)
    full: Any = field(default=None, repr=False)
    coupling: Coupling | None = field(default=None, repr=False)

    @property
    def unit_channels(self) -> list[tuple[int, ...]]:
        """The root channels of each unit."""
        if self.coupling is not None:
            return self.coupling.units
        size = self.channels // self.ch_groups
        return [tuple(u + g * size for g in range(self.ch_groups)) for u in range(size)]

    @property
    def units(self) -> int:
        return len(self.unit_channels)

    @property
    def unit_size(self) -> int:
        """Channels per unit when every unit has as many, else 1."""
        sizes = {len(u) for u in self.unit_channels}
        return sizes.pop() if len(sizes) == 1 else 1

    def channel_idxs(self, removed_units: list[int]) -> list[int]:
        """Units -> root channels."""
        units = self.unit_channels
        return sorted(c for u in removed_units for c in units[u])


def _where(exc: Exception, regrow: bool = False) -> str:
    """The innermost torch-pruning function ``exc`` passed through (``regrow``: or regrow function, named as
    such: one of regrow's corrections to torch-pruning's mappings)."""
    frame, where = exc.__traceback__, "its graph analysis"
    while frame is not None:
        code, module = frame.tb_frame.f_code.co_name, frame.tb_frame.f_globals.get("__name__") or ""
        if not code.startswith("<"):  # a named function, not the comprehension inside it
            if in_torch_pruning(module):
                where = f"torch-pruning's {code}"
            elif regrow and module.startswith("regrow.structural.tracing"):
                where = f"regrow's {code}"
        frame = frame.tb_next
    return where


def _tracing_error(exc: Exception, ran: bool) -> RegrowError:
    """One paragraph for a failed trace: the model's own forward pass, or (``ran``: it returned) torch-pruning's
    analysis of the graph it recorded."""
    if ran:
        where = _where(exc)
        return RegrowError(
            f"torch-pruning could not follow the channels through this model's graph ({type(exc).__name__}: "
            f"{exc}, in {where}); the model ran, but channel pruning cannot group its layers. Use pattern "
            "'unstructured' or '2:4', or pattern 'head' for attention heads."
        )
    return RegrowError(
        f"the model could not be traced for structural pruning ({type(exc).__name__}: {exc}); it must run on the "
        "given example inputs with autograd enabled."
    )


Inner = dict[str, set[str]]  # attention module -> its q, k, v or fused qkv layers: prepared.inner_projections


class StructureGraph:
    """torch-pruning's dependency graph over one model, with regrow's handlers for RMSNorm, attention and the
    channel shuffle, and its corrections to the index mappings (regrow.structural.tracing)."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = model
        shapes, views = self._trace(model, example_inputs, set())
        if views.changed:  # traced again, their outputs copied: the in-place op then changes the copy
            shapes, views = self._trace(model, example_inputs, views.changed)
        # the widest dimension of any tensor or parameter: a channel index far past it is a runaway (coupling.walk)
        self.widest = max(
            [
                *(max(s, default=0) for s in shapes.outputs.values()),
                *(max(p.shape, default=0) for p in model.parameters()),
            ],
            default=0,
        )
        self.near = near_widths(self.dg, shapes.outputs, self.widest)  # each node's own bound (coupling.walk)
        self.names = {m: n for n, m in model.named_modules()}
        self.order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        self.param_names = {p: n for n, p in model.named_parameters()}
        self.dg.ignored_params = [*self.dg.ignored_params, *per_head_parameters(model)]  # never cut (offsets.py)

    def _trace(
        self, model: nn.Module, example_inputs: Any, copied: set[nn.Module]
    ) -> tuple[ShapeRecorder, InPlaceViews]:
        """Build torch-pruning's graph (``self.dg``) from one forward pass, the outputs of ``copied`` copied."""
        was_training = model.training
        shapes = ShapeRecorder(model)  # the output shape of every op, for regrow's corrections of the mappings
        views = InPlaceViews(model, copied)  # outputs that are views the forward pass then changes in place
        ran: list[bool] = []  # set once the forward pass returns: a later failure is torch-pruning's analysis
        returned: list[Tensor] = []  # every tensor the model returned, traced from all of them

        def traced(m: nn.Module, x: Any) -> Any:
            with views, reading():  # the marks regrow's stand-ins put on what they compute (marks.py)
                returned[:] = shapes.run(all_outputs, m, x)
            ran.append(True)
            return list(returned)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch-pruning warns about loose parameters; regrow checks them
                self.dg = DependencyGraph(shapes.outputs, returned).build_dependency(
                    model,
                    example_inputs=example_inputs,
                    forward_fn=traced,
                    customized_pruners=customized_pruners(model),
                    verbose=False,
                )
            refresh_mappings(self.dg, shapes.shapes, example_batch(example_inputs))
        except RegrowError:
            raise
        except Exception as exc:  # noqa: BLE001 - tracing runs the user's forward; report it in one line
            raise _tracing_error(exc, bool(ran)) from None
        finally:
            model.train(was_training)
            remove_torch_pruning_hooks(model)
        return shapes, views

    # ---------------------------------------------------------------------------------------------
    def _describe(self, item: Any) -> tuple[str | None, str]:
        """(fqn, label) of a group item's target; fqn is None for graph-only ops (add, reshape, ...)."""
        dep = item.dep
        target = dep.target.module
        if isinstance(target, nn.Parameter):
            name = self.param_names.get(target, "?")
            return name, f"{name} (parameter)"
        if isinstance(target, nn.Module) and target in self.names:
            direction = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            name = self.names[target]
            return name, f"{name or '(model)'} ({type(target).__name__}, {direction})"
        return None, ""

    def _ch_groups(self, group: Any) -> int:
        """The most groups of any grouped member (regrow.structural.coupling.member_groups)."""
        return max([1, *(member_groups(self.dg, dep.target.module, dep.handler)[0] for dep, _ in group)])

    def channel_groups(
        self,
        candidates: set[str],
        ignored: set[str],
        attention: Inner,
        unheaded: Mapping[str, str] | None = None,
        outputs: Mapping[str, str] | None = None,
    ) -> list[ChannelGroup]:
        """Every group rooted at a Conv/Linear layer, with the reason when regrow will not prune it.

        ``attention`` maps each attention module to its inner projections (q, k, v or fused qkv): groups whose
        output channels include them are left to pattern 'head', or, for an attention in ``unheaded`` (with why
        pattern 'head' cannot remove its heads), left out saying so; so are groups inside one that its output
        projection (``outputs``) reads (offsets.enclosing_attention).
        """
        unheaded, outputs = unheaded or {}, outputs or {}
        out = []
        ignored_modules = [m for m, n in self.names.items() if n in ignored]

        def left_out(group: Any) -> tuple[str | None, Any]:  # the reasons its members alone give, and chunks
            layers = self._layers(group)
            if not any(n in candidates for n in layers[1]):
                return "not a target", None
            return attention_reason(self.model, attention, unheaded, outputs, layers)

        for root, group, reached, failure in self._root_groups(ignored_modules, lambda g: bool(left_out(g)[0])):
            if group is None:
                out.append(self._unmapped(root, failure, candidates, attention, unheaded))
                continue
            members, out_layers, reason = [], [], None
            for item in group:
                name, label = self._describe(item)
                dep = item.dep
                target = dep.target.module
                if isinstance(target, ops._OutputOp):
                    reason = reason or "its channels are the model's output"
                if getattr(target, "unbinds_channels", False):  # regrow.structural.chunks.unbound_channels
                    reason = reason or "an unbind makes each of its channels a tensor of its own, which cannot go"
                if name is None:
                    continue
                members.append(label)
                if isinstance(target, nn.Module):
                    if self.dg.is_out_channel_pruning_fn(dep.handler):
                        out_layers.append(name)
                    if dep.target.module in self.dg.token_outputs and name in out_layers:
                        reason = reason or f"its channels are the tokens of a sequence, which {name!r} mixes"
                    if isinstance(target, ChannelShuffle):
                        reason = reason or f"its channels go through the channel shuffle {name!r}, which keeps them"
                    if isinstance(target, TRANSPOSED_CONV) and 1 < target.groups != target.out_channels:
                        grouped = "a grouped transposed convolution (not depthwise)"
                        reason = reason or f"layer {name!r} is {grouped}, which is not supported"
                    if isinstance(target, nn.LSTM) and name in out_layers:
                        reason = reason or f"its channels are the hidden state of LSTM {name!r}, which does not shrink"
                    known = is_plain_norm(target) or is_root(target) or is_channel_filter(target)
                    if not isinstance(target, SUPPORTED) and not known:
                        reason = reason or f"layer {name!r} of type {type(target).__name__} is not supported"
            root = group[0].dep.target.module
            reason, chunks = (reason, None) if reason else left_out(group)
            channels = self.dg.get_out_channels(root)
            cg = ChannelGroup(
                name=self._group_name(root, out_layers),
                channels=channels,
                ch_groups=self._ch_groups(group),
                members=members,
                excluded=reason,
                root=root,
                root_handler=group[0].dep.handler,
                full=group,
            )
            if cg.excluded is None:  # grouped members are balanced in their own groups (coupling.couple)
                cg.coupling = couple(self.dg, reached, channels, chunks)
                if cg.coupling is None and channels % cg.ch_groups:
                    cg.excluded = f"{channels} channels do not split into {cg.ch_groups} channel groups"
                elif cg.units < 2:
                    cg.excluded = one_unit(channels, len(cg.coupling.pinned) if cg.coupling else 0)
            out.append(cg)
        return out

    def _layers(self, group: Any) -> tuple[list[str], list[str], list[str]]:
        """A group's members (layers and parameters), its output layers and the layers that read its channels."""
        members, out_layers, in_layers = [], [], []
        for item in group:
            name, _ = self._describe(item)
            if name is None:
                continue
            members.append(name)
            if isinstance(item.dep.target.module, nn.Module):
                (out_layers if self.dg.is_out_channel_pruning_fn(item.dep.handler) else in_layers).append(name)
        return members, out_layers, in_layers

    def _group_name(self, root: nn.Module, out_layers: list[str]) -> str:
        """A group's name: its first output layer in registration order (the stem of a residual stream, the first
        layer of a block), which reads better than the tracer's root."""
        return min(out_layers, key=lambda n: self.order.get(n, 1 << 30)) if out_layers else self.names.get(root, "?")

    def _root_groups(
        self, ignored: list[nn.Module], left_out: Callable[[Any], bool]
    ) -> Iterator[tuple[nn.Module, Any, Walk, Exception | None]]:
        """torch-pruning's ``get_all_groups``, one root layer at a time: ``(root, group, walk, None)``, or
        ``(root, None, [], error)`` for a root whose group cannot be mapped (an index mapping that raises), instead
        of one error that leaves nothing to prune; reported only if no group that did map took the root in as an
        output layer. ``walk`` (coupling.walk) is what the group was read off, for its coupling; a large walk
        whose group ``left_out`` says its members leave out ends early, by index."""
        skip = {id(m) for m in [*ignored, *self.dg.IGNORED_LAYERS_IN_TRACING]}
        visited: set[int] = set()
        failed: list[tuple[nn.Module, Exception]] = []
        roots, deferred, stale = list(self.dg.module2node), set(), None
        try:  # torch-pruning refreshes its mappings before each group; no walk changes them: once will do
            update_mappings(self.dg)
        except Exception as exc:  # noqa: BLE001 - one that raises (FocalNet's split once) leaves every root out
            stale = exc
        for m in roots:
            pruner = self.dg.get_pruner_of_module(m) if is_root(m) else None
            if id(m) in skip or id(m) in visited or pruner is None or pruner.get_out_channels(m) is None:
                continue
            if stale is not None:  # not a walk on a stale mapping, which may not end
                failed.append((m, stale))
                continue
            try:
                handler, out_channels = pruner.prune_out_channels, list(range(pruner.get_out_channels(m)))
                settled = lambda by_index, m=m, h=handler: left_out(pruning_group(self.dg, m, h, [], by_index))  # noqa: E731
                reached = walk(self.dg, m, handler, out_channels, self.widest, self.near, settled)  # may end early
                group = pruning_group(self.dg, m, handler, [], reached)
            except Exception as exc:  # noqa: BLE001 - an index mapping failed; the group is left out with it
                failed.append((m, exc))
                continue
            outs = [dep.target.module for dep, _ in group if self.dg.is_out_channel_pruning_fn(dep.handler)]
            if id(m) not in deferred and self._wider_root(m, group, visited):
                deferred.add(id(m))
                roots.append(m)  # after the wider layer's group, which takes this one in as a part
                continue
            visited.update(id(t) for t in outs)
            if not any(id(t) in skip for t in outs):
                yield m, group, reached, None
        for m, exc in failed:
            if id(m) not in visited:
                yield m, None, [], exc

    def _wider_root(self, root: nn.Module, group: Any, visited: set[int]) -> bool:
        """Whether ``root``'s group reaches only some of the output channels of another root layer not yet
        walked: MambaOut's depthwise convolution reads one chunk of its first projection's output, and its group,
        walked first, took the projection in with that chunk's channels only, so the gate and the other chunk were
        never a group. That layer's own group holds this one as a part (:meth:`parts`)."""
        for dep, idxs in group:
            layer = dep.target.module
            if layer is root or id(layer) in visited or not is_root(layer):
                continue
            if self.dg.is_out_channel_pruning_fn(dep.handler):
                width = self.dg.get_out_channels(layer)
                if width is not None and len(set(tp._helpers.to_plain_idxs(idxs))) < width:
                    return True
        return False

    def _unmapped(
        self, root: nn.Module, exc: Exception, candidates: set[str], attention: Inner, unheaded: Mapping[str, str]
    ) -> ChannelGroup:
        """The group of ``root`` whose channels could not be mapped, left out with the reason (an attention's
        own projection would be left to pattern 'head' anyway, and is said to be)."""
        pruner = self.dg.get_pruner_of_module(root)
        name = self.names.get(root, "?")
        owner = next((a for a, inner in attention.items() if name in inner), None)
        if name not in candidates:
            reason = "not a target"
        elif owner is not None:
            reason = inside_attention(owner, unheaded)
        else:
            exc = exc.cause if isinstance(exc, UnmappedOp) else exc
            reason = (
                f"its channels could not be mapped through the graph ({type(exc).__name__}: {exc}, in "
                f"{_where(exc, regrow=True)})"
            )
        return ChannelGroup(
            name=name,
            channels=pruner.get_out_channels(root),
            ch_groups=1,
            members=[f"{name} ({type(root).__name__}, out)"],
            excluded=reason,
            root=root,
            root_handler=pruner.prune_out_channels,
        )

    def cuts(self, group: ChannelGroup, removed_units: list[int]) -> list[Cut]:
        """Every member cut implied by removing ``removed_units`` from ``group``."""
        if not removed_units:
            return []
        if group.coupling is not None:
            members = group.coupling.member_idxs(removed_units)
        else:  # ask torch-pruning for this removal
            expanded = pruning_group(self.dg, group.root, group.root_handler, group.channel_idxs(removed_units))
            members = [(i.dep.target, i.dep.handler, tp._helpers.to_plain_idxs(i.idxs)) for i in expanded]
        return [c for node, handler, idxs in members if (c := self._cut(node, handler, idxs)) is not None]

    def parts(self, group: ChannelGroup) -> tuple[tuple[int, ...], ...]:
        """The units of each layer (or loose parameter) that holds only some of the group's channels and would be
        left with none were they all removed (one input of a concatenation whose output is the group's root, or
        the layer that reads one chunk of a split of it): the selection leaves each of them some units
        (regrow.structural.budget)."""
        every = list(range(group.units))
        partial = {
            (c.target, c.kind, c.out)
            for c in self.cuts(group, every)
            if group.channels > len(c.idxs) >= _width(self, c)
        }
        if not partial:
            return ()
        hits: dict[tuple[str, str, bool], list[int]] = {t: [] for t in partial}
        for unit in every:
            for c in self.cuts(group, [unit]):
                if (c.target, c.kind, c.out) in hits:
                    hits[c.target, c.kind, c.out].append(unit)
        return tuple(sorted({tuple(units) for units in hits.values() if units}))

    def _cut(self, node: Any, handler: Any, idxs: list[int]) -> Cut | None:
        """The cut of ``idxs`` on one member (None for graph-only ops and unnamed parameters)."""
        if not idxs:
            return None
        target = node.module
        plain = tuple(sorted(int(i) for i in idxs))
        if isinstance(target, nn.Parameter):
            name = self.param_names.get(target)
            if name is None:
                return None
            return Cut(name, "param", True, plain, dim=node.pruning_dim, layer_type="Parameter")
        if isinstance(target, nn.Module) and target in self.names:
            is_out = self.dg.is_out_channel_pruning_fn(handler)
            return Cut(self.names[target], "module", is_out, plain, layer_type=type(target).__name__)
        return None


def _width(graph: StructureGraph, cut: Cut) -> float:
    """The size of what ``cut`` slices: a layer's output or input channels (as its handler counts them) or a
    parameter's dimension; infinity when unknown, so that it is never taken for one a removal could empty."""
    if cut.kind == "param":
        param = graph.model.get_parameter(cut.target)
        return param.shape[cut.dim % param.dim()] if param.dim() else math.inf
    layer = graph.model.get_submodule(cut.target) if cut.target else graph.model
    width = graph.dg.get_out_channels(layer) if cut.out else graph.dg.get_in_channels(layer)
    return math.inf if width is None else width


def merge_cuts(cuts: list[Cut]) -> list[Cut]:
    """One cut per (target, direction): a concatenation's consumer receives cuts from several groups, all in
    the index space of the unshrunk model, so they must be applied together."""
    merged: dict[tuple[str, str, bool, int], Cut] = {}
    for cut in cuts:
        key = (cut.target, cut.kind, cut.out, cut.dim)
        if key in merged:
            old = merged[key]
            cut = Cut(
                cut.target, cut.kind, cut.out, tuple(sorted(set(old.idxs) | set(cut.idxs))), cut.dim, cut.layer_type
            )
        merged[key] = cut
    return list(merged.values())


def _slice_param(model: nn.Module, cut: Cut) -> None:
    parent_name, _, attr = cut.target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    param = getattr(parent, attr)
    dim = cut.dim % param.dim()
    gone = set(cut.idxs)
    keep = torch.tensor([i for i in range(param.shape[dim]) if i not in gone], dtype=torch.long, device=param.device)
    setattr(
        parent,
        attr,
        nn.Parameter(param.detach().index_select(dim, keep).contiguous(), requires_grad=param.requires_grad),
    )


def _per_output_parameters(module: nn.Module) -> list[str]:
    """A convolution's or linear layer's own parameters besides its weight and bias that hold one entry per output
    channel along dim 0 (timm's ``ScaledStdConv2d``: a gain of shape (out, 1, 1, 1)); torch-pruning's handler
    slices only the weight and the bias."""
    if isinstance(module, nn.modules.conv._ConvNd):
        width = module.out_channels  # a transposed convolution's weight holds its inputs along dim 0
    elif isinstance(module, nn.Linear):
        width = module.out_features
    else:
        return []
    return [
        name
        for name, p in module.named_parameters(recurse=False)
        if name not in ("weight", "bias") and p.dim() and p.shape[0] == width
    ]


def apply_cuts(model: nn.Module, cuts: list[Cut]) -> None:
    """Shrink ``model`` in place (the cuts' indices refer to the model before any of them).

    Each layer's handler is chosen from the layer as it is before any cut: a grouped convolution whose output
    cut leaves one channel per group looks depthwise to torch-pruning afterwards, and the depthwise handler
    would then take its input cut for an output cut and lower ``groups`` by the number of channels (ResNeXt:
    "non-positive groups is not supported").
    """
    box = tp.pruner.function.PrunerBox
    custom = customized_pruners(model)
    merged = merge_cuts(cuts)
    handlers = {}
    for cut in merged:
        if cut.kind == "module" and cut.target not in handlers:
            module = model.get_submodule(cut.target) if cut.target else model
            pruner = next((p for t, p in custom.items() if isinstance(module, t)), None)
            if pruner is None and isinstance(module, nn.GroupNorm):
                pruner = GroupNormPruner()  # torch-pruning's fails on a norm without a bias
            handlers[cut.target] = pruner or box.get(ops.module2type(module))
            if handlers[cut.target] is None:
                raise RegrowError(f"no handler to shrink layer {cut.target!r} of type {type(module).__name__}.")
    for cut in merged:
        if cut.kind == "param":
            _slice_param(model, cut)
            continue
        module = model.get_submodule(cut.target) if cut.target else model
        if cut.out:
            extras = _per_output_parameters(module)
            handlers[cut.target].prune_out_channels(module, list(cut.idxs))
            for name in extras:
                _slice_param(model, Cut(f"{cut.target}.{name}" if cut.target else name, "param", True, cut.idxs, 0))
        else:
            handlers[cut.target].prune_in_channels(module, list(cut.idxs))
    follow(model)


def head_count(module: nn.Module) -> int | None:
    """The head count a module declares (``num_heads``, ``num_attention_heads``, ``n_heads``, ``n_head`` or
    ``heads``, Hiera's)."""
    return next((getattr(module, a) for a in HEAD_ATTRS if _is_int(getattr(module, a, None))), None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_attention(module: nn.Module) -> bool:
    """regrow's attention, a module that declares its head count, or one in the layout of Hugging Face's Llama
    family (``head_dim`` and ``num_key_value_groups``, the head count read from the projections' width)."""
    if isinstance(module, nn.MultiheadAttention) or is_position_bias(module):  # a bias one value a head: no attention
        return False
    if isinstance(module, MultiheadAttention) or head_count(module) is not None:
        return True
    if _is_int(getattr(module, "head_size", None)) and isinstance(getattr(module, "query_key_value", None), nn.Linear):
        return True  # Hugging Face's GPT-NeoX: the head count read from the fused projection's width
    return _is_int(getattr(module, "head_dim", None)) and _is_int(getattr(module, "num_key_value_groups", None))


def find_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold attention heads (``is_attention``); of nested ones only the innermost, which computes the
    heads (torchvision's MaxViT stores ``n_heads`` on the layer around its attention too)."""
    found = {name: module for name, module in model.named_modules() if is_attention(module)}
    return {n: m for n, m in found.items() if not any(o != n and o.startswith(f"{n}." if n else "") for o in found)}
