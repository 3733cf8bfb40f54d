"""Which channels of a group go together, and what removing them cuts: one traversal of the dependency graph.

torch-pruning answers "what must shrink if these root channels go?" by walking its dependency graph from the
root layer, mapping the indices through every concatenation, split, slice and flatten on the way. Two things
follow from asking that once per group, with all root channels at once, and keeping for every index reached
*which root channel it came from* (torch-pruning's own answer merges that away):

* **Units.** Removing one root channel can force others of the same group: in a GhostNet module the output is
  ``cat([x, depthwise(x)])``, so channel ``k`` and channel ``k + C/2`` live and die together, and a group of
  80 channels has 40 removable units, not 80. Counting 80 let the budget search "remove half" and empty a
  layer. Root channels reached from one another form one unit (as do the channels a grouped convolution
  keeps balanced).
* **Speed.** The cuts of any removal are read off the traversal, instead of walking the graph again for every
  probe and every budget candidate (a DenseNet-121's concatenations made each walk cost ~15 ms, ~120 groups).

The walk is torch-pruning's own (``DependencyGraph.get_pruning_group``) minus the merging, made to end on every
graph (:func:`walk`); :func:`pruning_group` is torch-pruning's merged answer from it. tests/test_zoo.py holds
both to torch-pruning's own on real architectures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.index_mapping import _SliceIndexMapping
from torch_pruning.pruner import function


@dataclass
class Coupling:
    """The units of one channel group and, for every member dimension reached, the indices each root channel
    cuts there (in the order the walk reached the members)."""

    units: list[tuple[int, ...]]  # root channels of each unit, units ordered by their first channel
    members: list[tuple[Any, Any, dict[int, list[int]]]]  # (graph node, handler, root channel -> its idxs)
    pinned: tuple[int, ...] = ()  # root channels no unit holds: they stay (see _pinned)

    def member_idxs(self, removed_units: list[int]) -> list[tuple[Any, Any, list[int]]]:
        """(graph node, handler, sorted indices) of every member that loses something when these units go."""
        roots = {c for u in removed_units for c in self.units[u]}
        out = []
        for node, handler, by_root in self.members:
            idxs = sorted({i for r in roots for i in by_root.get(r, ())})
            if idxs:
                out.append((node, handler, idxs))
        return out


def _root_handler(module: nn.Module, handler: Any) -> Any:
    if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        return function.prune_depthwise_conv_out_channels  # as get_pruning_group does
    return handler


Walk = list[tuple[Any, list[Any]]]  # (dependency, hybrid indices) reached, unmerged


class RunawayMapping(Exception):
    """An index mapping sent a channel index far past every dimension of the model's tensors (see :func:`walk`)."""


class UnmappedOp(Exception):
    """A walk reached an op whose index mapping torch-pruning could not compute: ``cause`` is its error
    (regrow.structural.tracing.update_mappings)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


SLACK = 4  # how far past the widest dimension near a node an index may go before the walk stops (see walk)


def near_widths(dg: Any, outputs: Mapping[tuple[Any, int], tuple[int, ...]], widest: int) -> dict[Any, int]:
    """The widest dimension at and next to each node of ``dg``: of the tensors the node and the nodes it reads or
    feeds return (``outputs``, traced shapes by autograd node and output number, or the sizes their autograd node
    saved) and of their own parameters; ``widest`` (the model's widest) where none of them is known."""
    traced: dict[Any, int] = {}
    for (fn, _), shape in outputs.items():
        traced[fn] = max(traced.get(fn, 0), max(shape, default=0))
    own = {
        node: max(_saved_width(node.grad_fn, traced), _param_width(module), _coordinates(module))
        for module, node in dg.module2node.items()
    }
    near = {}
    for node, width in own.items():
        known = [w for w in (width, *(own.get(n, 0) for n in [*node.inputs, *node.outputs])) if w > 0]
        near[node] = max(known) if known else widest
    return near


def _saved_width(fn: Any, traced: Mapping[Any, int]) -> int:
    """The widest dimension of the tensor ``fn`` made, as traced, and of the sizes it saved (a view's input, a
    matrix product's operands: the steps inside ``F.linear`` return nothing a trace sees)."""
    if fn is None:
        return 0
    sizes = [getattr(fn, name) for name in dir(fn) if name.startswith("_saved_") and name.endswith("sizes")]
    dims = [int(d) for size in sizes if isinstance(size, tuple) for d in size if isinstance(d, int)]
    return max([traced.get(fn, 0), *dims])


def _coordinates(module: Any) -> int:
    """The width of the coordinates a concatenation, split or unbind maps indices through (all its parts
    together; unbind's parts are no dimension of any tensor); 0 for any other op or layer (whatever attributes
    of those names it has: a buffer called ``offsets``)."""
    if not isinstance(module, (ops._ConcatOp, ops._SplitOp, ops._UnbindOp)):
        return 0
    sizes = getattr(module, "concat_sizes", None) or getattr(module, "split_sizes", None) or []
    offsets = getattr(module, "offsets", None) or []
    widths = [sum(s for s in sizes if isinstance(s, int))]
    if len(offsets) > 1 and all(isinstance(o, int) for o in offsets):
        widths.append(2 * offsets[-1] - offsets[-2])  # one part past the last offset, whether or not it is the end
    return max(widths)


def _param_width(module: Any) -> int:
    params = [module] if isinstance(module, nn.Parameter) else []
    if isinstance(module, nn.Module):
        params = list(module.parameters(recurse=False))
    return max((max(p.shape, default=0) for p in params), default=0)


def _bounded(dep: Any, idxs: list[Any], width: int, mapped: bool = False) -> None:
    """Raise :class:`RunawayMapping` if ``idxs``, sent through ``dep``'s mappings (unless already ``mapped``),
    reach ``SLACK`` times ``width``, the widest dimension near its target, or fall below zero."""
    if not mapped:
        for mapping in dep.index_mapping:
            if mapping is not None and idxs:
                idxs = mapping(idxs)
    low = min((i.idx for i in idxs), default=0)
    if low < 0:
        raise RunawayMapping(
            f"index {low} reached {dep.target.name}, below zero: torch-pruning's index mappings do not fit this graph"
        )
    top = max((i.idx for i in idxs), default=-1)
    if top >= SLACK * width:
        shown = f"2**64{top - 2**64:+d}, a mapping's arithmetic that wrapped round" if top >= 2**63 else top
        raise RunawayMapping(
            f"index {shown} reached {dep.target.name}, {SLACK} times past the widest dimension of the tensors "
            f"and parameters at and next to it ({width}): torch-pruning's index mappings do not fit this graph"
        )


class _Settled(Exception):  # noqa: N818 - not an error: the by-index walk is the answer (walk)
    def __init__(self, reached: Walk) -> None:
        super().__init__()
        self.reached = reached


def walk(
    dg: Any,
    root: nn.Module,
    handler: Any,
    idxs: list[int],
    widest: int | None = None,
    near: Mapping[Any, int] | None = None,
    settled: Callable[[Walk], bool] | None = None,
) -> Walk:
    """torch-pruning's walk from ``root`` with channels ``idxs``: each (dependency, hybrid indices) reached,
    unmerged. An index whose root channel a mapping lost (grouped-query attention's repeat) has root None.

    torch-pruning goes on along a path until it meets a dependency it has seen *with the same index list*. On
    timm's ReXNet (``cat([x[:, :c] + shortcut, x[:, c:]])`` block after block), with the concatenation widths
    torch-pruning inferred wrongly, the lists that came round differed path by path and its walk did not end
    (past five minutes, still growing; with the traced widths it ends in a second). Every mapping sends each
    index on its own (a concatenation's offset, a slice, a flatten's stride), so what a path reaches depends only
    on the (member, index, root channel) it carries: this walk carries on only with those it has not met yet,
    and reaches the same ones, each once, whatever the mappings.

    That ends only if the mappings keep the indices bounded. torch-pruning passes channel indices through the
    matrix products of a hand-written attention (timm's MaxViT: ``q @ k.transpose(-2, -1)``, softmax,
    ``attn @ v``) and flattens them at each reshape there, so a path that comes round multiplies them again
    (768 channels, then indices up to 8,191, 262,143, 8.4 million, ...; past five minutes). An index is a
    position in some dimension of some tensor, but not always at once: torch-pruning's concatenation and split
    mappings carry indices through coordinates of their own (all their parts together), and it passes a
    channel on through ops whose tensors are narrower (a norm over the channels, SwiftFormer's), harmlessly
    where it comes back. An index at ``SLACK`` times the widest dimension near the node it reaches (``near``,
    from :func:`near_widths`; ``widest``, the model's widest, for a node not in it), or the root's channels if
    more, means the mappings do not fit the graph: the walk stops with :class:`RunawayMapping`, and the root's
    group is left out with the reason. So does an index below zero, at once: no mapping that fits sends one
    there, but a split whose offsets torch-pruning inferred wrongly does, and each time round by as much again
    (timm's DeepSeek ViT: its rotary embedding's ``chunk(2, -1)`` of the head width got offsets 0, -2,048,
    -7,168, and the walk from each ``qkv`` reached hundreds of thousands of negative indices, past five minutes,
    none of them past the bound above). The largest and smallest indices are sent through a dependency's
    mappings first, so a runaway stops before its next list is built. A walk that reaches an op whose mapping
    torch-pruning could not compute stops with :class:`UnmappedOp`.

    The bound was the model's widest dimension once; in a language model that is its vocabulary (150,000 and
    more), and in Qwen3.5's linear attention, whose tensors there are a few thousand wide, a runaway walk
    reached millions of (member, index, root channel) triples before its indices came to 600,000. A walk that
    grows past ``LARGE`` triples also checks first, once, whether its indices stay bounded, reaching each
    (member, index) only once whatever root channel carries it (:func:`_traverse`): the same pairs, so the same
    answer, from far fewer steps where many root channels meet (8,192 in Qwen3.5's ``in_proj_qkv``). Where they
    do not, it costs a quarter more: a residual stream (each root channel its own index in every member) of
    timm's DeepSeek ViT, 872,448 triples, 0.85 s walked without the check, 1.07 s with it.

    ``settled`` is then asked, with that walk by index, whether the group's members alone settle it (a group
    left out whatever its units: inside attention, or no target); where it says so, the walk ends and returns
    the walk by index, each (member, index) with the first root channel that reached it: the same members and
    indices, which name the group and say why it is left out, but not which root channels go together. In
    EfficientFormerV2's attention every root channel of a projection reaches every index of the scores,
    through its talking heads: 1.6 to 2.4 million triples a walk, 2 to 4 s each, eight of them, where the walk by
    index reaches 6,000 to 18,000 pairs in 0.01 to 0.04 s.
    """
    handler = _root_handler(root, handler)
    node = dg.module2node[root]
    start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
    if widest is None:
        return _traverse(dg, node, handler, start, lambda target: None)

    def width(target: Any) -> int:
        return widest if near is None else max(near.get(target, widest), len(start))

    def check() -> None:
        by_index = _traverse(dg, node, handler, start, width, by_index=True)
        if settled is not None and settled(by_index):
            raise _Settled(by_index)

    try:
        return _traverse(dg, node, handler, start, width, check=check)
    except _Settled as done:
        return done.reached


def _idx(i: Any) -> int:
    return i.idx


LARGE = 100_000  # (member, index, root channel) triples a walk reaches before it checks that it ends (see walk)


def _traverse(
    dg: Any,
    node: Any,
    handler: Any,
    start: list[Any],
    width: Callable[[Any], int | None],
    by_index: bool = False,
    check: Callable[[], None] | None = None,
) -> Walk:
    """The walk from ``node`` with ``start``, each index bounded by ``width`` of the node it reaches: each
    (member, index, root channel) carried on once, or with ``by_index`` each (member, index) once, whatever root
    channel carries it. ``check`` runs once when the walk passes ``LARGE`` triples."""
    key = (lambda i: i.idx) if by_index else (lambda i: i)
    begin = Dependency(handler, handler, source=node, target=node)
    reached = [(begin, start)]
    seen = {(node, handler): {key(i) for i in start}}
    stack = list(reached)
    unmapped = getattr(dg, "unmapped", {})
    count = len(start)
    while stack:
        dep, idxs = stack.pop()
        ends: list[Any] | None = None  # the largest and smallest index of idxs, found once for all its edges
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            if new_dep.target in unmapped:  # its indices cannot be mapped onwards: the group is left out
                raise UnmappedOp(unmapped[new_dep.target])
            bound = width(new_dep.target)
            if bound is not None:
                if ends is None:
                    top, low = max(idxs, key=_idx), min(idxs, key=_idx)
                    ends = [top] if top is low else [top, low]
                _bounded(new_dep, ends, bound)  # before a runaway's list is built
            new = idxs
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if bound is not None:
                _bounded(new_dep, new, bound, mapped=True)
            known = seen.setdefault((new_dep.target, new_dep.handler), set())
            fresh: dict[Any, Any] = {}
            for i in new:
                if key(i) not in known:
                    fresh.setdefault(key(i), i)
            if not fresh:
                continue
            known.update(fresh)
            new = list(fresh.values())
            count += len(new)
            if check is not None and count > LARGE:
                check, run = None, check
                run()
            reached.append((new_dep, new))
            stack.append((new_dep, new))
    return reached


def pruning_group(dg: Any, root: nn.Module, handler: Any, idxs: list[int], reached: Walk | None = None) -> Any:
    """torch-pruning's ``DependencyGraph.get_pruning_group(root, handler, idxs)``, walked as :func:`walk` does
    (which ends where theirs may not), or read off ``reached``, that walk made already: the same members, each
    with its plain indices and ``root_idxs``. The graph's index mappings must be current
    (``regrow.structural.tracing.refresh_mappings``)."""
    group = Group()
    ignored = getattr(dg, "ignored_params", [])
    for dep, found in walk(dg, root, handler, idxs) if reached is None else reached:
        target = dep.target.module
        if not (isinstance(target, nn.Parameter) and any(target is p for p in ignored)):
            group.add_and_merge(dep, found)
    group._DG = dg
    for k, item in enumerate(group.items):
        group[k] = _helpers.GroupItem(item.dep, _helpers.to_plain_idxs(item.idxs))
        group[k].root_idxs = _helpers.to_root_idxs(item.idxs)
    return group


def member_groups(dg: Any, module: Any, handler: Any) -> tuple[int, int]:
    """(groups, channels per group) of a member's side that ``handler`` cuts; (1, 0) when nothing must stay
    balanced: not grouped, or depthwise (one output channel per group, which torch-pruning removes with its
    group)."""
    if not isinstance(module, nn.Module) or isinstance(module, tuple(ops.TORCH_OTHERS or ())):
        return 1, 0
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        return 1, 0
    if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels:  # transposed ones too
        return 1, 0
    if dg.is_out_channel_pruning_fn(handler):
        groups, width = pruner.get_out_channel_groups(module), pruner.get_out_channels(module)
    else:
        groups, width = pruner.get_in_channel_groups(module), pruner.get_in_channels(module)
    if not groups or groups <= 1 or not width or width % groups:
        return 1, 0
    return groups, width // groups


def equal_chunks(module: Any) -> tuple[int, int]:
    """(chunks, channels per chunk) of a split whose forward cuts chunks of one width (``torch.split(x, w, 1)``,
    ``x.chunk(n, 1)``; marked by regrow.structural.chunks.fill_split_sizes): after surgery it cuts them again
    from the new width, so every chunk must lose as many channels, at the same places for the layers each chunk
    feeds; (1, 0) for any other member."""
    chunks = getattr(module, "equal_chunks", None) if isinstance(module, ops._SplitOp) else None
    return chunks or (1, 0)


class _Classes:
    """Union-find over root channels."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[tuple[int, ...]]:
        found: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            found.setdefault(self.find(i), []).append(i)
        return sorted((tuple(v) for v in found.values()), key=lambda u: u[0])


def couple(
    dg: Any, reached: Walk, channels: int, chunked: Mapping[Any, tuple[int, tuple[int, ...]]] | None = None
) -> Coupling | None:
    """The :class:`Coupling` of a group of ``channels`` root channels, from ``reached``, the walk from its root
    with all of them (the walk the group itself was read off); None when the walk cannot tell the root channels
    apart (the caller then asks torch-pruning removal by removal).

    Root channels that cut the same index of a member go together; so do those that cut the same channel of
    each group of a grouped member (a grouped convolution must lose the same channels in every group), found in
    the member's own indices: Res2NeXt's grouped convolutions each read one chunk of a split of the root, so
    their groups are not the root's. A split into chunks of one width is tied the same way, chunk for group
    (Res2Net's ``torch.split(x, self.width, 1)``, EdgeNeXt's ``x.chunk(n, 1)``), and so is the output of a layer
    in ``chunked`` (an attention's projection: its heads and the widths of its sections), head for group, in
    each section (regrow.structural.offsets); there the root channels that reach no other layer stay.
    """
    if any(i.root_idx is None for _, idxs in reached for i in idxs):
        return None
    ignored = getattr(dg, "ignored_params", [])
    classes = _Classes(channels)
    members: dict[tuple[int, Any], tuple[Any, Any, dict[int, list[int]]]] = {}
    for dep, idxs in reached:
        target = dep.target.module
        if isinstance(target, nn.Parameter) and any(target is p for p in ignored):
            continue
        # by the handler's equality, not its identity: torch-pruning gives each edge a bound method of its own, and
        # two edges into one layer are the same member (EfficientViT's cascaded attention: a query channel reaches
        # its key by the keys' edge, the key itself by the root's, and the two were not made one unit)
        key = (id(dep.target), dep.handler)
        if key not in members:
            members[key] = (dep.target, dep.handler, {})
        by_root = members[key][2]
        for i in idxs:
            by_root.setdefault(int(i.root_idx), []).append(int(i.idx))
    first_owner: dict[tuple[tuple[int, Any], int], int] = {}  # (member, index) -> a root channel that cuts it
    for key, (_, _, by_root) in members.items():
        for r, idxs in by_root.items():
            for i in idxs:
                owner = first_owner.setdefault((key, i), r)
                if owner != r:
                    classes.union(owner, r)  # two root channels that cut the same index go together
    for key, (node, handler, _) in members.items():
        groups, size = member_groups(dg, node.module, handler)
        last = size
        if chunked and node.module in chunked and dg.is_out_channel_pruning_fn(handler):
            _unite_heads(classes, first_owner, key, *chunked[node.module])
            continue
        if groups == 1:
            groups, size = equal_chunks(node.module)
            last = getattr(node.module, "last_chunk", size)
        # one channel per group (the input of a depthwise convolution with a multiplier): a removal would take
        # whole groups, which torch-pruning cannot, so all of them form one unit
        for u in range(size if groups > 1 else 0):
            chunks = range(groups if u < last else groups - 1)
            roots = [first_owner[key, u + g * size] for g in chunks if (key, u + g * size) in first_owner]
            for r in roots[1:]:
                classes.union(roots[0], r)
        # a narrower last chunk (the remainder of x.chunk(n, 1)): the other chunks' channels past its width go
        # all together, with the last channel of every chunk. Removing them all leaves equal chunks, one channel
        # narrower; removing some would make the forward, which cuts chunks of ceil(channels / n), cut them
        # elsewhere than the layers they feed were cut; and while any unit stays, so does the last chunk (x.chunk
        # returns fewer chunks than asked once the last would be empty).
        if groups > 1 and last < size:
            tail = [
                first_owner[key, u + g * size]
                for g in range(groups)
                for u in (range(last - 1, size) if g < groups - 1 else [last - 1])
                if (key, u + g * size) in first_owner
            ]
            for r in tail[1:]:
                classes.union(tail[0], r)
    pinned = _pinned(reached) | (_unread(members, reached, channels) if chunked else set())
    units = [u for u in classes.groups() if pinned.isdisjoint(u)]
    held = {c for u in units for c in u}
    return Coupling(units, list(members.values()), tuple(c for c in range(channels) if c not in held))


def _unite_heads(
    classes: _Classes, first_owner: Mapping[tuple[Any, int], int], key: Any, heads: int, sections: tuple[int, ...]
) -> None:
    """Root channels that cut the same offset of every head of one section of an attention's projection go
    together (regrow.structural.offsets)."""
    start = 0
    for width in sections:
        size = width // heads
        for u in range(size):
            roots = [first_owner[key, i] for i in range(start + u, start + width, size) if (key, i) in first_owner]
            for r in roots[1:]:
                classes.union(roots[0], r)
        start += width


def in_torch_pruning(module_name: str | None) -> bool:
    """Whether ``module_name`` is torch-pruning's (its graph-only ops, its hooks)."""
    return (module_name or "").split(".")[0] == "torch_pruning"


def remove_torch_pruning_hooks(model: nn.Module) -> None:
    """Remove the forward hooks torch-pruning's tracing put on ``model`` (it leaves them when the forward raises);
    every other hook stays."""
    for module in model.modules():
        for hooks, extras in (
            (module._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
            (module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)),
        ):
            for key in [k for k, hook in hooks.items() if in_torch_pruning(getattr(hook, "__module__", None))]:
                del hooks[key]
                for extra in extras:
                    getattr(module, extra, {}).pop(key, None)


def _unread(members: Mapping[Any, tuple[Any, Any, dict[int, list[int]]]], reached: Walk, channels: int) -> set[int]:
    """The root channels that reach no layer or parameter but the root itself: the values of an attention's
    projection, when the trace loses them at a fold of the heads into the batch, before the output projection
    (regrow.structural.offsets). Their readers unseen, they stay."""
    root = (id(reached[0][0].target), reached[0][0].handler)
    read: set[int] = set()
    for key, (node, _, by_root) in members.items():
        if key != root and not in_torch_pruning(type(node.module).__module__):
            read.update(by_root)
    return set(range(channels)) - read


def one_unit(channels: int, pinned: int) -> str:
    """Why a group whose ``channels`` are one unit (but the ``pinned`` ones, which stay) is left out."""
    if channels == 1:
        return "it has a single channel"
    kept = f" ({pinned} of them are read one at a time by position and stay)" if pinned else ""
    return f"its {channels} channels can only be removed all together{kept}"


def _pinned(reached: Walk) -> set[int]:
    """The root channels that reach a tensor read channel by channel: every reader of it (of its chunk, for a
    split) a slice one channel wide (``gates[:, l:l + 1]`` for each ``l``). The code names each position; removing
    one of those channels would hand its position to the next. FocalNet multiplies its context by one gate per
    focal level that way; the gates went with whichever context channel they were tied to, and every probe of
    the modulation's projection failed. Their units stay whole. A one-channel slice beside wider readers
    (ReXNet's ``y[:, x.shape[1]:]``, whose bound follows the widths) is no such reading."""
    pinned = set()
    for dep, idxs in reached:
        if _one_channel(dep) is not None and all(_one_channel(d) is not None for d in _siblings(dep)):
            pinned.update(int(i.root_idx) for i in idxs if i.root_idx is not None)
    return pinned


def _one_channel(dep: Any) -> Any:
    """The slice mapping of ``dep`` when it leads into a slice one channel wide, else None."""
    mapping = next((m for m in dep.index_mapping if isinstance(m, _SliceIndexMapping)), None)
    sizes = getattr(dep.target.grad_fn, "_saved_self_sym_sizes", None)
    if dep.target.type != ops.OPTYPE.SLICE or mapping is None or mapping.reverse or sizes is None:
        return None
    dim = int(mapping.dim) - (2**64 if int(mapping.dim) >= 2**63 else 0)  # unsigned where counted from the end
    size = int(sizes[dim % len(sizes)])
    return mapping if len(range(mapping.start, min(mapping.end, size), mapping.step)) == 1 else None


def _siblings(dep: Any) -> list[Any]:
    """The edges from ``dep``'s source to every reader of the same tensor (of the same chunk, for a split)."""
    chunks = getattr(dep.source.module, "chunk_readers", None) or {}
    chunk = chunks.get(dep.target)
    readers = [r for r, k in chunks.items() if k == chunk] if chunk is not None else dep.source.outputs
    return [d for d in dep.source.dependencies if any(d.target is r for r in readers)]
