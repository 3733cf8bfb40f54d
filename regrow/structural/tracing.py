"""Corrections to torch-pruning's index mappings, for layouts it reads as channels-first.

torch-pruning maps channel indices through the tensor operations between layers, assuming channels sit in
dim 1 (NCHW) and that a reshape which changes the channel count flattens ``(C, H, W)`` into ``C*H*W``
features, channel ``c`` becoming features ``c*HW .. c*HW + HW - 1``. Vision transformers and hybrids keep
channels last, and three of their operations were mapped wrong:

* a **slice of a spatial dimension** (LeViT's subsampling, ``x.view(B, H, W, C)[:, ::2, ::2]``) was read as a
  slice of channels: channel ``c`` became ``c / 2``, or nothing when odd;
* a **reshape that keeps the channels last** (Swin's ``(B, H, W, C) -> (B, H/2, 2, W/2, 2, C)``) was read as
  a flatten when the channel count downstream differed: channel ``c`` became channels ``4c .. 4c + 3``;
* a **flatten of channels-last dimensions** (Swin's patch merging, ``(B, H/2, W/2, 2, 2, C) -> (B, H/2, W/2,
  4C)``) puts channel ``c`` at ``c + k*C`` (k < 4), interleaved the other way round;
* a **reshape that folds the batch with another dimension** (attention's heads into the batch before a
  ``bmm``) maps no channel at all; read as flattens, a chain of them multiplied the indices until one group
  took minutes to map (EfficientFormerV2).

:func:`refresh_mappings` recomputes torch-pruning's mappings and applies the corrections (the output shape of
each reshape comes from :class:`ShapeRecorder`, which watches the tracing forward pass). A corrected node is
retyped so that torch-pruning's own refreshes, which it runs on every query, leave it alone. The equivalence
check would catch a wrong mapping, but only by leaving the group out.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.node import Node

from regrow.batches import batch_size
from regrow.errors import RegrowError
from regrow.structural.concat import concat_widths
from regrow.structural.marks import SAME_CHANNELS, marked
from regrow.structural.operands import (
    _none,
    channels_first_products,
    untie_broadcast_operands,
    untie_channel_free,
    untie_products,
)


class ShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor a forward pass produces: ``shapes`` by its autograd node (single
    results), ``outputs`` by ``(node, output number)`` (every result, those of a split or chunk included).

    A Linear of ``model`` whose weight the forward pass uses functionally, ``F.linear(x, self.qkv.weight, bias)``
    (timm's BEiT, EVA and Swin V2 attention, which add a bias of their own), is run as the module instead, plus
    that bias: the trace then sees the layer, where it saw a loose weight in a matrix product and passed the
    channels of its input straight through it to its output (BEiT's residual stream reached the attention's
    per-head bias table). Same result; only while tracing."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.shapes: dict[Any, tuple[int, ...]] = {}
        self.outputs: dict[tuple[Any, int], tuple[int, ...]] = {}
        self.linears = {id(m.weight): m for m in (model.modules() if model else ()) if isinstance(m, nn.Linear)}
        self.running: set[nn.Module] = set()  # the Linear modules whose own forward runs now

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = self._as_module(args, kwargs) if func is F.linear else None
        if out is None:
            out = func(*args, **(kwargs or {}))
        self._record(out)
        return out

    def _record(self, out: Any) -> None:
        if isinstance(out, Tensor) and out.grad_fn is not None:
            self.shapes.setdefault(out.grad_fn, tuple(out.shape))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.grad_fn is not None:
                self.outputs.setdefault((t.grad_fn, t.output_nr), tuple(t.shape))

    def _as_module(self, args: Any, kwargs: Any) -> Tensor | None:
        """``F.linear`` on a Linear's own weight outside its forward, run as that module (and the bias given)."""
        given = {**dict(zip(("input", "weight", "bias"), args, strict=False)), **(kwargs or {})}
        layer = self.linears.get(id(given.get("weight")))
        if layer is None or layer.weight is not given["weight"] or layer in self.running:
            return None
        bias = given.get("bias")
        if layer.bias is not None and bias is not layer.bias:
            return None  # its own bias would be added too
        out = layer(given["input"])
        self._record(out)
        return out if bias is None or bias is layer.bias else out + bias

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        handles = [
            h
            for layer in self.linears.values()
            for h in (
                layer.register_forward_pre_hook(lambda m, a: self.running.add(m)),
                layer.register_forward_hook(lambda m, a, o: self.running.discard(m)),
            )
        ]
        try:
            with self:
                return fn(*args)
        finally:
            for h in handles:
                h.remove()
            self.running.clear()


class InPlaceViews:
    """While tracing: finds the layers (modules without children) whose output is a view that the forward pass then
    changes in place, and hands on a copy of the output of each layer in ``copied``.

    A Linear over a 3-D input returns a view of its matrix product. When the model then changes it in place
    (timm's NaFlexViT: ``x = self.proj(x)``, then ``x.add_(pos_embed)``), autograd routes it through
    ``CopySlices``, and the node torch-pruning recorded as the Linear's output is no longer on any path from the
    model's outputs: the Linear fell out of every group, and shrinking the channels it feeds broke the forward
    pass ("768 vs 765"). A copy, handed on by a forward hook that runs before torch-pruning's, is no view: the
    in-place op changes it, and the Linear stays on the path. Only for a second trace of the modules the first
    found (``changed``): every other graph is traced as before."""

    def __init__(self, model: nn.Module, copied: set[nn.Module]) -> None:
        self.model, self.copied = model, copied
        self.seen: list[tuple[nn.Module, Tensor, int]] = []
        self.changed: set[nn.Module] = set()
        self.handles: list[Any] = []

    def _hook(self, module: nn.Module, args: Any, out: Any) -> Any:
        if not isinstance(out, Tensor) or out._base is None or out.is_inference():  # the last keep no version
            return None
        if module in self.copied:
            return out.clone()
        self.seen.append((module, out, out._version))
        return None

    def __enter__(self) -> InPlaceViews:
        # the layers, whose outputs torch-pruning records; a block's own output is not a node of its graph
        leaves = [m for m in self.model.modules() if next(m.children(), None) is None]
        self.handles = [m.register_forward_hook(self._hook, prepend=True) for m in leaves]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.changed = {m for m, out, version in self.seen if out._version != version}
        self.seen.clear()


class TiledIndexMapping:
    """Channel ``c`` of a channels-last input is ``c + k * channels`` (k < ``tiles``) of the flattened output."""

    def __init__(self, channels: int, tiles: int, reverse: bool = False) -> None:
        self.channels, self.tiles, self.reverse = channels, tiles, reverse

    def __call__(self, idxs: list[Any]) -> list[Any]:
        if self.reverse:  # output index -> input channel
            found = (_helpers._HybridIndex(idx=i.idx % self.channels, root_idx=i.root_idx) for i in idxs)
            return list(dict.fromkeys(found))
        return [
            _helpers._HybridIndex(idx=i.idx + k * self.channels, root_idx=i.root_idx)
            for k in range(self.tiles)
            for i in idxs
        ]


def channels_in(dg: Any, node: Any) -> int | None:
    """torch-pruning's count of the channels ``node`` reads, None where it has none or its inference fails (a
    split whose chunk widths it read off another dimension than its consumers: Gemma 4's 2-D rotary embedding).
    A concatenation's are its offsets' end: torch-pruning adds up the widths it infers of its inputs, and read a
    slice of a layer's output as the whole output (regrow.structural.concat)."""
    offsets = getattr(node.inputs[0].module, "offsets", None) if node.inputs else None
    if offsets and node.inputs[0].type == ops.OPTYPE.CONCAT:
        return offsets[-1]
    try:
        return shape_infer.infer_out_channels_recursively(dg, node.inputs[0], [0]) if node.inputs else None
    except (IndexError, ZeroDivisionError, TypeError):
        return None


def _stale_edges(node: Any) -> list[Any]:
    """The dependencies torch-pruning may have given a reshape or slice mapping for ``node``: both ways between
    it and its inputs, and between it and an output that is not a reshape itself (whose own mapping sits there)."""
    outputs = [n for n in node.outputs if n.type != ops.OPTYPE.RESHAPE]
    edges = [dep for dep in node.dependencies if any(dep.target is n for n in [*node.inputs, *outputs])]
    return edges + [dep for n in [*node.inputs, *outputs] for dep in n.dependencies if dep.target is node]


STALE = (index_mapping._FlattenIndexMapping, index_mapping._SliceIndexMapping)


def _retype(node: Any, mapping: Any = None, reverse: Any = None, stale: tuple[type, ...] = STALE) -> None:
    """Make ``node`` element-wise for torch-pruning, dropping the ``stale`` mappings it gave it (reshape and
    slice ones), and set ``mapping`` on the edges from its inputs (``reverse`` on the edges back to them)."""
    node.type = ops.OPTYPE.ELEMENTWISE
    for dep in _stale_edges(node):
        for k, old in enumerate(dep.index_mapping):  # the second: a slice's after a split's (_split_mappings)
            if isinstance(old, stale) and (k == 0 or isinstance(old, index_mapping._SliceIndexMapping)):
                dep.index_mapping[k] = None
    for source in node.inputs:
        for dep in source.dependencies:
            if dep.target is node and mapping is not None:
                dep.index_mapping[0] = mapping
        for dep in node.dependencies:
            if dep.target is source and reverse is not None:
                dep.index_mapping[0] = reverse


def _slice_dim(fn: Any) -> int:
    """The dimension a slice's autograd node cut, counted from the front (:func:`_saved_dim` reads one counted
    from the end, ``dim=-1``, which autograd saves unsigned)."""
    return _saved_dim(fn) % len(fn._saved_self_sym_sizes)


def _slices_from_the_end(dg: Any) -> None:
    """A slice from the end (``x[:, -k:]``, ``x[:, :-1]``) saves that bound as an unsigned 64-bit number,
    ``2**64 - k``: torch-pruning's mapping sent channel ``c`` of the slice to ``2**64 - k + c`` of its input, and
    took none of the input's channels into it (Qwen3.5's linear attention). Such a bound is read from the end of
    the dimension, as Python's slicing reads it."""
    for node in dg.module2node.values():
        fn = node.grad_fn
        if node.type != ops.OPTYPE.SLICE or not hasattr(fn, "_saved_self_sym_sizes"):
            continue
        size = int(fn._saved_self_sym_sizes[_slice_dim(fn)])
        own = [dep for dep in node.dependencies if any(dep.target is n for n in node.inputs)]
        own += [dep for n in node.inputs for dep in n.dependencies if dep.target is node]
        for dep in own:  # this slice's mappings only: an edge to a slice it feeds holds that one's
            for mapping in dep.index_mapping:
                if isinstance(mapping, index_mapping._SliceIndexMapping):
                    if _signed(mapping.start) < 0:
                        mapping.start = max(_signed(mapping.start) + size, 0)
                    if _signed(mapping.end) < 0:
                        mapping.end = max(_signed(mapping.end) + size, 0)


def _untie_spatial_slices(dg: Any) -> None:
    """A slice whose dimension is not as long as the channels that flow through it is, for the channels, the
    element-wise op it is (torch-pruning mapped it whenever it cut dim 1 of a 4-D tensor, dim 2 of a 3-D one, or
    a dimension counted from the end, whose number it read as 2**64 - 1 and did not recognise: the width of a 4-D
    map, but also the channels of a Conv1d's or a Linear's output)."""
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.SLICE or not node.inputs or not hasattr(fn, "_saved_self_sym_sizes"):
            continue
        sizes = [int(s) for s in fn._saved_self_sym_sizes]
        dim = _slice_dim(fn)
        if (len(sizes), dim) not in ((4, 1), (3, 2)) and _saved_dim(fn) >= 0:
            continue  # torch-pruning's reading stands: every dim of a 2-D or 5-D tensor is channels to it
        chunk = (getattr(node.inputs[0].module, "chunk_readers", None) or {}).get(node)
        if chunk is not None:  # a slice of one chunk of a split (FocalNet's gates[:, l:l + 1]) reads that chunk
            channels = node.inputs[0].module.split_sizes[chunk]
        else:
            channels = channels_in(dg, node)
        if channels is not None and channels != sizes[dim]:
            _retype(node)


def _untie_broadcasts(dg: Any) -> None:
    """torch-pruning maps every 5-D ``expand`` as Hugging Face's ``repeat_kv`` (key/value heads repeated for
    grouped-query attention), with ``repeat = output channels // input channels``. Other broadcasts make the
    repeat 0: no channel then maps forward, and mapping back divides by zero (GCViT's global query, Hiera's mask
    units; the error ended the whole grouping). A broadcast of a channels-last tensor (its last dim as wide as
    the channels that flow in: GCViT's query, broadcast over windows) is the element-wise op it is for the
    channels; any other (a product of per-head tensors, but also a channels-first broadcast such as a 3-D
    gate over depth, whose channels then go unmapped and whose group fails its probe) keeps torch-pruning's
    forward mapping, none, and gets none back. An expand with a repeat of 1 or more keeps torch-pruning's
    mapping."""
    for node in list(dg.module2node.values()):
        if node.type != ops.OPTYPE.EXPAND or not hasattr(node.grad_fn, "_saved_self_sym_sizes"):
            continue
        gqa = [d.index_mapping[0] for d in _stale_edges(node)]
        if not any(isinstance(m, index_mapping._GQAIndexMapping) and m.repeat * m.head_dim == 0 for m in gqa):
            continue
        gqa_only = (index_mapping._GQAIndexMapping,)  # the expand's own mapping; its neighbours' stay
        if int(node.grad_fn._saved_self_sym_sizes[-1]) == channels_in(dg, node):
            _retype(node, stale=gqa_only)
        else:
            _retype(node, _none, _none, stale=gqa_only)


def _channels_last_reshapes(dg: Any, shapes: dict[Any, tuple[int, ...]]) -> None:
    """Reshapes of a tensor whose channels are (unambiguously) its last dim: identity when they stay last,
    tiled when trailing dims are merged into them."""
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.RESHAPE or not hasattr(fn, "_saved_self_sym_sizes") or fn not in shapes:
            continue
        before, after = [int(s) for s in fn._saved_self_sym_sizes], list(shapes[fn])
        channels = channels_in(dg, node)
        if len(before) < 3 or channels is None or before[-1] != channels or before[1] == channels:
            continue  # not channels-last, or cannot tell
        if after and after[-1] == channels:
            _retype(node)
            continue
        merged = before[len(after) - 1 : -1]
        tiles = math.prod(merged) if merged else 0
        kept = after[:-1] == before[: len(after) - 1]
        if after and len(after) < len(before) and kept and after[-1] == tiles * channels:
            _retype(node, TiledIndexMapping(channels, tiles), TiledIndexMapping(channels, tiles, reverse=True))


def _channels_first_reshapes(dg: Any, shapes: dict[Any, tuple[int, ...]]) -> None:
    """Reshapes of the dimensions after the channels of a channels-first tensor, ``(B, C, H*W)`` into ``(B, C, H,
    W)`` (EfficientViM's state-space mixer, back to a map after a matrix product): channel ``c`` stays ``c``.
    torch-pruning reads a reshape as a flatten wherever the channel counts it infers on its two sides differ; past
    the matrix product they did, and channel ``c`` became ``2c, 2c + 1``."""
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.RESHAPE or not hasattr(fn, "_saved_self_sym_sizes") or fn not in shapes:
            continue
        before, after = [int(s) for s in fn._saved_self_sym_sizes], list(shapes[fn])
        if len(before) < 3 or len(after) < 3 or before[:2] != after[:2]:
            continue
        channels = channels_in(dg, node)
        if channels == before[1] and channels != before[-1] and channels != after[-1]:
            _retype(node)


def _split_channel_reshapes(dg: Any, shapes: dict[Any, tuple[int, ...]]) -> None:
    """A channels-first tensor's channels viewed as ``P`` blocks of ``C``: ``(B, P*C, ...)`` into ``(B, P, C, ...)``
    (timm's selective-kernel attention: one logit per path and channel, ``x.view(B, paths, C, H, W)``, weighing
    the paths stacked as ``(B, paths, C, H, W)``). Channel ``c`` of the output is ``c + k*C`` (k < P) of the
    input; torch-pruning read it as a flatten, channel ``c`` as ``2c, 2c + 1``, and the group failed its probe."""
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.RESHAPE or not hasattr(fn, "_saved_self_sym_sizes") or fn not in shapes:
            continue
        before, after = [int(s) for s in fn._saved_self_sym_sizes], list(shapes[fn])
        if len(before) < 4 or len(after) != len(before) + 1 or after[1] < 2 or before[0] != after[0]:
            continue  # a feature map's channels only, not tokens unflattened into rows (B, H*W, C) -> (B, H, W, C)
        if before[1] != after[1] * after[2] or before[2:] != after[3:] or before[-1] == before[1]:
            continue  # not such a view, or cannot tell channels-first from channels-last
        if channels_in(dg, node) != before[1]:
            continue
        blocks, channels = after[1], after[2]
        _retype(node, TiledIndexMapping(channels, blocks, reverse=True), TiledIndexMapping(channels, blocks))


def _channel_repeats(dg: Any, shapes: dict[Any, tuple[int, ...]]) -> None:
    """Each channel of a channels-first tensor repeated ``k`` times, ``x[:, :, None].expand(B, C, k, ...)`` then
    ``flatten(1, 2)`` (PiT's pooling stand-in): channel ``c`` becomes ``c*k`` to ``c*k + k - 1``, the broadcast is
    element-wise for the channels, the flatten a flatten. torch-pruning maps the broadcast as ``repeat_kv`` (none
    of it, :func:`_untie_broadcasts`) and the reshapes of 2-D and 4-D tensors only."""
    flatten = index_mapping._FlattenIndexMapping
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.RESHAPE or not hasattr(fn, "_saved_self_sym_sizes") or fn not in shapes:
            continue
        before, after = [int(s) for s in fn._saved_self_sym_sizes], list(shapes[fn])
        if len(before) < 5 or after != [before[0], before[1] * before[2], *before[3:]] or before[2] < 2:
            continue
        source = node.inputs[0] if len(node.inputs) == 1 else None
        while source is not None and source.type == ops.OPTYPE.ELEMENTWISE and len(source.inputs) == 1:
            source = source.inputs[0]  # the copy that makes the broadcast contiguous
        if source is None or source.type != ops.OPTYPE.EXPAND or not hasattr(source.grad_fn, "_saved_self_sym_sizes"):
            continue
        broadcast = [int(s) for s in source.grad_fn._saved_self_sym_sizes]
        if broadcast != [before[0], before[1], 1, *before[3:]] or channels_in(dg, source) != before[1]:
            continue
        _retype(source, stale=(index_mapping._GQAIndexMapping,))
        _retype(node, flatten(stride=before[2]), flatten(stride=before[2], reverse=True))


def _marked_views(dg: Any) -> None:
    """Views a stand-in marked as keeping the channels where they are (regrow.structural.marks.same_channels):
    channel ``c`` stays ``c``, whatever the shapes suggest."""
    for node in list(dg.module2node.values()):
        if node.type == ops.OPTYPE.RESHAPE and marked(node, SAME_CHANNELS):
            _retype(node)


def _unit_dim_reshapes(dg: Any, shapes: dict[Any, tuple[int, ...]]) -> None:
    """A view that only adds or drops dimensions of size 1, or keeps its shape (the views ``matmul`` makes of 3-D
    operands), moves no element: a layer scale viewed as ``(1, C, 1, 1)`` (``x.mul(self.gamma.reshape(1, -1, 1,
    1))``: InceptionNeXt, ConvNeXt-style blocks), a pooled map's ``(B, C, 1, 1)`` flattened to ``(B, C)``. Channel
    ``c`` stays ``c``; torch-pruning counted the channels after
    the view from the layers downstream, and where that count came out larger (1280 for InceptionNeXt's last
    stage of 320 channels, past a 2x2 map) it read the view as a flatten and sent channel ``c`` to ``4c .. 4c +
    3``."""
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.RESHAPE or not hasattr(fn, "_saved_self_sym_sizes") or fn not in shapes:
            continue
        before, after = [int(s) for s in fn._saved_self_sym_sizes], list(shapes[fn])
        if [s for s in before if s != 1] == [s for s in after if s != 1]:
            _retype(node)


def _merges_batch(a: list[int], b: list[int], batch: int) -> bool:
    """Whether shape ``b`` is ``a`` (whose dim 0 is the ``batch``) with dim 1, or a leading factor of it, merged
    into dim 0: (B, h, N, d) into (B*h, N, d), or (B, h*d, N) into (B*h, d, N)."""
    if len(a) < 2 or len(b) < 2 or a[0] != batch or b[0] <= a[0] or b[0] % a[0]:
        return False
    k = b[0] // a[0]
    return k == a[1] or (a[1] % k == 0 and b[1] == a[1] // k)


def _batch_reshapes(dg: Any, shapes: dict[Any, tuple[int, ...]], batch: int) -> None:
    """Reshapes that merge the batch with another dimension, or split it (attention folding its heads into the
    batch for a ``bmm``: EfficientFormerV2): no channel of the input is a channel of the
    output. torch-pruning reads them as flattens of dim 1 and maps channel ``c`` to ``c * stride`` onwards; a
    chain of them multiplies the indices (8192 into 262144) until one root's mapping runs for minutes. Those
    map nothing here; a coupling this leaves unseen fails the group's probe (regrow.structural.units). Left to
    torch-pruning: folds in which the channels of the layer before stay one whole dimension (frames through a
    2-D CNN, (B, T, C, H, W) into (B*T, C, H, W)) and token folds with the channels last."""
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.RESHAPE or not hasattr(fn, "_saved_self_sym_sizes") or fn not in shapes:
            continue
        before, after = [int(s) for s in fn._saved_self_sym_sizes], list(shapes[fn])
        if not (_merges_batch(before, after, batch) or _merges_batch(after, before, batch)):
            continue  # not the batch: a table flattened (Swin V2's position bias, (16, 16, h) into (256, h))
        channels = channels_in(dg, node)
        if channels is not None and channels in before[1:3] and channels in after[1:3]:
            continue  # the channels stay one whole dimension: frames, (B, T, C, H, W) into (B*T, C, H, W) and back
        if before[-1] == after[-1] and (min(len(before), len(after)) == 2 or before[-1] == channels):
            continue  # channels last, kept: tokens (B*N, C) into (B, N, C) and back, as torch-pruning maps them
        _retype(node, _none, _none)


def _signed(value: int) -> int:
    """A number autograd saved as unsigned 64-bit (a negative dim, a slice bound from the end), as Python's."""
    return value - 2**64 if value >= 2**63 else value


def _saved_dim(fn: Any) -> int | None:
    dim = getattr(fn, "_saved_dim", None)
    return None if dim is None else _signed(int(dim))


def mark_outputs(module2node: dict[Any, Any], returned: list[Tensor], dg: Any) -> None:
    """Every tensor the model returned after the first gets an output node: torch-pruning adds one only where a
    trace starts at an op it had not met, so a second output that is a layer's output or an intermediate of the
    first (features returned beside the logits) was none, and a group whose channels reach it would change its
    shape unnoticed (the checks compare the first output). Split and unbind results are left as they are (their
    index mappings count their readers)."""
    producers = {node.grad_fn: node for node in module2node.values() if node.grad_fn is not None}
    for tensor in returned:
        node = producers.get(tensor.grad_fn)
        if node is None or node.type in (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND):
            continue
        if any(isinstance(after.module, ops._OutputOp) for after in node.outputs):
            continue
        op = ops._OutputOp(dg._op_id, shape=tensor.shape)
        dg._op_id += 1
        module2node[op] = marker = Node(module=op, grad_fn=None)
        marker.add_input(node)
        node.add_output(marker)


def _split_mappings(dg: Any) -> None:
    """The mapping of every edge between a split and a consumer of one of its chunks (``chunk_readers``, set by
    :func:`fill_split_sizes`): that chunk's offsets, also where a chunk has several consumers, and for a slice of
    the chunk, the slice's after them (both took the edge's first mapping, and the slice's was lost)."""
    for node in dg.module2node.values():
        readers = getattr(node.module, "chunk_readers", None)
        if node.type != ops.OPTYPE.SPLIT or not readers or not node.enable_index_mapping:
            continue
        offsets = node.module.offsets
        for consumer, k in readers.items():
            forward = [d for d in node.dependencies if d.target is consumer]
            back = [d for d in consumer.dependencies if d.target is node]
            sliced = consumer.type == ops.OPTYPE.SLICE
            if sliced:  # a slice of the chunk (FocalNet's gates[:, l:l + 1]): the chunk's offsets, then the slice's
                index_mapping.update_slice_index_mapping(dg, consumer)
            for dep in forward:
                first, then = dep.index_mapping[:2]
                then = first if sliced and isinstance(first, index_mapping._SliceIndexMapping) else then
                dep.index_mapping[:2] = [index_mapping._SplitIndexMapping(offset=offsets[k : k + 2]), then]
            for dep in back:
                first, then = dep.index_mapping[:2]
                chunk = index_mapping._SplitIndexMapping(offset=offsets[k : k + 2], reverse=True)
                in_slice = sliced and isinstance(first, index_mapping._SliceIndexMapping)
                dep.index_mapping[:2] = [first, chunk] if in_slice else [chunk, then]


_MAPPINGS = {  # torch-pruning's update_index_mapping, op by op
    ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
    ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
    ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
    ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
    ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
    ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
}


def _each_mapping(dg: Any) -> None:
    """torch-pruning's ``update_index_mapping``, one op at a time: an op whose mapping raises is kept in
    ``dg.unmapped`` (node -> the error) instead of ending the analysis of the whole model, and a walk that reaches
    it stops there (regrow.structural.coupling.walk), so only the groups whose channels pass through it are left
    out. Gemma 4's vision encoder (a 2-D rotary embedding: the head dimension split in halves and rotated with
    ``cat(dim=-1)``, read as channels) and SHViT (a reshape, ``ZeroDivisionError``) failed as a whole that way."""
    dg.unmapped = {}
    for node in list(dg.module2node.values()):
        update = _MAPPINGS.get(node.type)
        if update is None:
            continue
        try:
            update(dg, node)
        except Exception as exc:  # noqa: BLE001 - torch-pruning's mapping of this op failed; the walks say so
            dg.unmapped[node] = exc


def _quiet(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` without torch-pruning's warning where its count of a tensor's channels gives up (past 500 steps
    through many chunks or branches: EfficientViT (MIT)'s heads, CoaT's parallel blocks, hundreds of times a
    model). The count is then unknown, as where it finds no width: the mapping through that op stays as
    torch-pruning leaves it, each channel to itself, and the checks judge the groups through it."""

    @functools.wraps(fn)
    def quiet(*args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
            fn(*args, **kwargs)

    return quiet


@_quiet
def update_mappings(dg: Any) -> None:
    """torch-pruning's ``update_index_mapping`` (op by op, :func:`_each_mapping`), with each split's edges mapped
    to the chunk each consumer reads
    (:func:`_split_mappings`) and the order of the two mappings fixed on the edge from a concatenation back to a
    split whose chunk it reads directly.

    torch-pruning keeps a split's mapping in the first slot of an edge and a concatenation's in the second, and
    applies them in that order. From the split to the concatenation that is right (chunk, then place in the
    concatenation); back, it shifted an index of the concatenation by the chunk's offset before it asked which
    input of the concatenation the index belongs to. Where the chunk sits at offset 0 of both (a CSP or
    ShuffleNet block's first chunk) the two orders agree; Res2Net's last chunk, concatenated fourth, sent the
    channels of the first three inputs back to the split's first chunk.
    """
    _each_mapping(dg)
    _split_mappings(dg)
    _slices_from_the_end(dg)
    concat_widths(dg)
    for node in dg.module2node.values():
        if node.type != ops.OPTYPE.CONCAT:
            continue
        for dep in node.dependencies:
            first, second = (dep.index_mapping + [None, None])[:2]
            if (
                isinstance(first, index_mapping._SplitIndexMapping)
                and isinstance(second, index_mapping._ConcatIndexMapping)
                and first.reverse
                and second.reverse
            ):
                dep.index_mapping[0], dep.index_mapping[1] = second, first


def example_batch(inputs: Any) -> int:
    """The batch size of the example inputs; -1 where their structure does not tell (no batch folds are read)."""
    try:
        return batch_size(inputs)
    except (RegrowError, AttributeError, IndexError, StopIteration, TypeError):
        return -1


@_quiet
def refresh_mappings(dg: Any, shapes: dict[Any, tuple[int, ...]], batch: int) -> None:
    """torch-pruning's index mappings, recomputed (:func:`update_mappings`), with regrow's corrections for
    channels-last layouts and for the folds of the example inputs' ``batch`` with other dimensions."""
    products = channels_first_products(dg)
    update_mappings(dg)
    untie_products(products)
    untie_channel_free(dg)
    untie_broadcast_operands(dg, shapes)
    _untie_spatial_slices(dg)
    _channel_repeats(dg, shapes)
    _untie_broadcasts(dg)
    _channels_last_reshapes(dg, shapes)
    _channels_first_reshapes(dg, shapes)
    _split_channel_reshapes(dg, shapes)
    _batch_reshapes(dg, shapes, batch)
    _unit_dim_reshapes(dg, shapes)
    _marked_views(dg)
