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

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.pruner import function


@dataclass
class Coupling:
    """The units of one channel group and, for every member dimension reached, the indices each root channel
    cuts there (in the order the walk reached the members)."""

    units: list[tuple[int, ...]]  # root channels of each unit, units ordered by their first channel
    members: list[tuple[Any, Any, dict[int, list[int]]]]  # (graph node, handler, root channel -> its idxs)

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


SLACK = 4  # how far past the widest dimension an index may go before the walk stops (see walk)


def _bounded(dep: Any, idxs: list[Any], widest: int, mapped: bool = False) -> None:
    """Raise :class:`RunawayMapping` if ``idxs``, sent through ``dep``'s mappings (unless already ``mapped``),
    reach ``SLACK`` times the widest dimension."""
    if not mapped:
        for mapping in dep.index_mapping:
            if mapping is not None and idxs:
                idxs = mapping(idxs)
    top = max((i.idx for i in idxs), default=-1)
    if top >= SLACK * widest:
        raise RunawayMapping(
            f"index {top} reached {dep.target.name}, {SLACK} times past the widest dimension of any tensor or "
            f"parameter of the model ({widest}): torch-pruning's index mappings do not fit this graph"
        )


def walk(dg: Any, root: nn.Module, handler: Any, idxs: list[int], widest: int | None = None) -> Walk:
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
    mappings carry indices through coordinates of their own, which run past the ``widest`` dimension of any
    tensor or parameter by a little on the way (up to 2x on timm's DPN, InceptionNeXt and EfficientFormerV2,
    whose groups prune). An index at ``SLACK`` times that width means the mappings do not fit the graph: the
    walk stops with :class:`RunawayMapping`, and the root's group is left out with the reason. The largest
    index is sent through a dependency's mappings first, so a runaway stops before its next list is built. A walk
    that reaches an op whose mapping torch-pruning could not compute stops with :class:`UnmappedOp`.
    """
    handler = _root_handler(root, handler)
    node = dg.module2node[root]
    start = Dependency(handler, handler, source=node, target=node)
    reached = [(start, [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs])]
    seen = {(node, handler): set(reached[0][1])}
    stack = list(reached)
    unmapped = getattr(dg, "unmapped", {})
    while stack:
        dep, idxs = stack.pop()
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            if new_dep.target in unmapped:  # its indices cannot be mapped onwards: the group is left out
                raise UnmappedOp(unmapped[new_dep.target])
            if widest is not None:
                _bounded(new_dep, [max(idxs, key=lambda i: i.idx)], widest)  # before a runaway's list is built
            new = idxs
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if widest is not None:
                _bounded(new_dep, new, widest, mapped=True)
            known = seen.setdefault((new_dep.target, new_dep.handler), set())
            new = [i for i in dict.fromkeys(new) if i not in known]
            if not new:
                continue
            known.update(new)
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
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == module.out_channels:
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
    ``x.chunk(n, 1)``; marked by regrow.structural.tracing.fill_split_sizes): after surgery it cuts them again
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


def couple(dg: Any, reached: Walk, channels: int) -> Coupling | None:
    """The :class:`Coupling` of a group of ``channels`` root channels, from ``reached``, the walk from its root
    with all of them (the walk the group itself was read off); None when the walk cannot tell the root channels
    apart (the caller then asks torch-pruning removal by removal).

    Root channels that cut the same index of a member go together; so do those that cut the same channel of
    each group of a grouped member (a grouped convolution must lose the same channels in every group), found in
    the member's own indices: Res2NeXt's grouped convolutions each read one chunk of a split of the root, so
    their groups are not the root's. A split into chunks of one width is tied the same way, chunk for group
    (Res2Net's ``torch.split(x, self.width, 1)``, EdgeNeXt's ``x.chunk(n, 1)``).
    """
    if any(i.root_idx is None for _, idxs in reached for i in idxs):
        return None
    ignored = getattr(dg, "ignored_params", [])
    classes = _Classes(channels)
    members: dict[tuple[int, int], tuple[Any, Any, dict[int, list[int]]]] = {}
    for dep, idxs in reached:
        target = dep.target.module
        if isinstance(target, nn.Parameter) and any(target is p for p in ignored):
            continue
        key = (id(dep.target), id(dep.handler))
        if key not in members:
            members[key] = (dep.target, dep.handler, {})
        by_root = members[key][2]
        for i in idxs:
            by_root.setdefault(int(i.root_idx), []).append(int(i.idx))
    first_owner: dict[tuple[tuple[int, int], int], int] = {}  # (member, index) -> a root channel that cuts it
    for key, (_, _, by_root) in members.items():
        for r, idxs in by_root.items():
            for i in idxs:
                owner = first_owner.setdefault((key, i), r)
                if owner != r:
                    classes.union(owner, r)  # two root channels that cut the same index go together
    for key, (node, handler, _) in members.items():
        groups, size = member_groups(dg, node.module, handler)
        last = size
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
    return Coupling(classes.groups(), list(members.values()))
