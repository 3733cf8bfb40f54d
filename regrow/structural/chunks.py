"""The splits and concatenations of channels in torch-pruning's graph: the chunk widths and the readers of each
chunk, the widths of the tensors concatenated, and which of them are channels at all.

torch-pruning infers these from the graph around each op, and where it guesses wrong every index mapped through
the op lands on the wrong channel (and the group fails its probe); regrow reads them off the shapes that the
tracing forward pass recorded (:class:`regrow.structural.tracing.ShapeRecorder`). The mappings themselves are
recomputed by :func:`regrow.structural.tracing.refresh_mappings`.
"""

from __future__ import annotations

from typing import Any

from torch_pruning import ops

from regrow.structural.tracing import _retype, _saved_dim, channels_in


def feature_map_mappings(dg: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> None:
    """Index mappings back on for the splits and concatenations of a feature map's channels.

    torch-pruning turns the mapping off at every split and concatenation downstream of a loose parameter with
    three dimensions, for a ViT's position embedding ``(1, tokens, C)``, concatenated with the class token along
    the tokens. EdgeNeXt's attention holds a temperature ``(heads, 1, 1)``, upstream of every later block: its
    ``x.chunk(4, 1)`` then sent every channel of the stream to each chunk's convolution (a 42-channel convolution
    cut at index 167), and every group of the stream after the first attention failed its probe. Where the traced
    tensor has four or five dimensions and the split or concatenation is along dim 1, it is a feature map's
    channels, and the mapping is turned on again. So is it where the tensor has two, three or four dimensions, the
    split or concatenation is along the last, and its first input is as wide there as the channels torch-pruning
    counts for it: a feature vector's (DINOv2's classifier reads its class token beside the mean of its patch
    tokens, and read the first half alone), tokens', or a channels-last map's (Hugging Face's Swin V2 concatenates
    four of its patches below its logit scale, heads x 1 x 1); not a Conv1d's ``(B, C, L)`` cut along its length.
    EVA-02's gated MLP chunks its first layer's output in two halves (``x.chunk(2, dim=-1)``) downstream of the
    position embedding; without the mapping each of the 1,024 channels was a unit of its own, a removal cut the
    halves unequally, and the probe failed ("The size of tensor a (511) must match the size of tensor b (510)").
    """
    for node in dg.module2node.values():
        if node.type not in (ops.OPTYPE.SPLIT, ops.OPTYPE.CONCAT) or node.enable_index_mapping:
            continue
        dim, shape = _saved_dim(node.grad_fn), outputs.get((node.grad_fn, 0))
        if dim is None or shape is None:
            continue
        if (len(shape) in (4, 5) and dim % len(shape) == 1) or (
            len(shape) in (2, 3, 4) and dim % len(shape) == len(shape) - 1 and _tokens(dg, node, outputs)
        ):
            node.enable_index_mapping = True


def _tokens(dg: Any, node: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> bool:
    """Whether the first input of a split or concatenation along the last of two to four dimensions holds its
    channels last (features; tokens; a map, as Swin V2 merges patches): as wide there as torch-pruning counts."""
    source = node.inputs[0] if node.inputs else None
    shape = outputs.get((getattr(source, "grad_fn", None), 0))
    return shape is not None and len(shape) in (2, 3, 4) and shape[-1] == channels_in(dg, node)


def _channel_dim(dim: int, rank: int) -> int | None:
    """The dimension of a ``rank``-D tensor that a split or concatenation along ``dim`` cuts where torch-pruning maps
    it as one of channels: dim 1, or the last one given as -1 (autograd saves it unsigned, and torch-pruning takes
    it for channels: tokens' or a channels-last map's); None for any other, which torch-pruning does not map."""
    if dim % rank == 1:
        return 1
    return rank - 1 if dim == -1 else None


def fill_split_sizes(dg: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> None:
    """The chunk widths of each split along the channels, read from the traced shapes, and which chunk each of
    its consumers reads.

    torch-pruning gives a split's k-th consumer the k-th chunk, and infers the chunk widths from the consumers
    when the split's grad_fn does not name them (``torch.split(x, 32, 1)`` and ``x.chunk(n, 1)`` on the torch
    versions where it saves ``_saved_self_sym_sizes``). Res2Net's ``spx = torch.split(x, w, 1)`` feeds chunk 0 to
    a convolution, chunks 1 and 2 to sums and the last to a concatenation: torch-pruning saw the consumers in the
    order concatenation, sums, convolution, inferred widths [128, 32, 32, 32] for four chunks of 32, and every
    index mapped through the split landed on the wrong layer. A CSPNet stage's first half feeds a block's
    convolution and its residual sum, two consumers of one chunk: torch-pruning inferred [64, 0, 32] for two
    halves of 32. Where each consumer reads one chunk and every chunk is read, the consumers are put in chunk
    order, the widths are the traced ones, and ``chunk_readers`` (consumer -> chunk) gives
    :func:`regrow.structural.tracing.update_mappings` each consumer's chunk; anything else is left to
    torch-pruning. A split by one width into chunks of that width is marked ``equal_chunks`` (chunks, width): its
    chunks must each lose as many channels (regrow.structural.coupling); ``last_chunk`` is the width of the last,
    narrower where the width does not divide the channels (EdgeNeXt's ``x.chunk(3, 1)`` of 88 channels: 30, 30
    and 28). Splits along the last dimension count too (:func:`_channel_dim`): MambaOut's ``torch.split(x, (gate,
    passed, convolved), dim=-1)`` has the readers activation, concatenation and convolution in chunk order,
    torch-pruning gave the gate's chunk to the concatenation, and every probe of its MLP channels failed.
    """
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.SPLIT or fn is None:
            continue
        dim = _saved_dim(fn)
        if dim is None:
            continue
        sizes = []
        while (shape := outputs.get((fn, len(sizes)))) is not None:
            sizes.append(shape)
        at = _channel_dim(dim, len(sizes[0])) if sizes else None
        if at is None:
            continue  # torch-pruning maps splits of channels only
        widths = [s[at] for s in sizes]
        # torch.split(x, w, 1) or x.chunk(n, 1): the forward cuts chunks of one width again after surgery (the
        # last one narrower where the width does not divide the channels: the remainder)
        if hasattr(fn, "_saved_split_size") and len(set(widths[:-1])) <= 1 and 0 < widths[-1] <= widths[0]:
            node.module.equal_chunks = (len(widths), widths[0])
            node.module.last_chunk = widths[-1]
        readers: dict[Any, int] = {}
        for consumer in node.outputs:
            chunks = {nr for f, nr in getattr(consumer.grad_fn, "next_functions", ()) if f is fn}
            if len(chunks) != 1:
                break  # a consumer of two chunks (or of none the trace saw): torch-pruning's mapping stays
            readers[consumer] = chunks.pop()
        else:
            if set(readers.values()) == set(range(len(widths))):
                node.outputs.sort(key=readers.__getitem__)
                node.module.split_sizes = [widths[readers[c]] for c in node.outputs]  # read by consumer
                node.module.offsets = [sum(widths[:k]) for k in range(len(widths) + 1)]
                node.module.chunk_readers = readers


def fill_concat_sizes(dg: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> None:
    """Channel counts of concatenation inputs, read from the traced shapes.

    torch-pruning infers each input's channels by walking the graph back to a layer. Past a residual sum or a
    slice of the model's input it may find none, and then fails on the sum of the counts (timm's CSPDarkNet and
    CoaT: "unsupported operand type(s) for +: 'int' and 'NoneType'"); past a slice it may find the width of the
    tensor sliced, not of the slice (ReXNet, ``cat([x[:, :c] + shortcut, x[:, c:]])``: [627, 185] for inputs of
    174 and 11 channels), and every index mapped through the concatenation then lands on the wrong channel. Where
    the traced shapes give the size along the channel dimension (:func:`_channel_dim`) of every tensor
    concatenated there (``outputs`` of :class:`regrow.structural.tracing.ShapeRecorder`), one graph input each,
    adding up to the output's, those sizes are set; anything else is left to torch-pruning. MambaOut concatenates
    ``(passed, convolved)`` along the last dimension, and torch-pruning counted the whole first projection (256
    channels) for the first.
    """
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        out = outputs.get((fn, 0))
        if node.type != ops.OPTYPE.CONCAT or node.module.concat_sizes is not None or out is None:
            continue
        dim = _saved_dim(fn)
        if dim is None:
            continue
        at = _channel_dim(dim, len(out))
        if at is None:
            continue  # torch-pruning maps concatenations of channels only
        recorded = [outputs.get(edge) for edge in fn.next_functions]
        if len(recorded) != len(node.inputs):
            continue
        if all(r is not None and len(r) == len(out) for r in recorded) and sum(r[at] for r in recorded) == out[at]:
            node.module.concat_sizes = [r[at] for r in recorded]
            # channels last: the output is as wide as these together (regrow.structural.dependency.concat_width)
            node.module.channels_last = at == len(out) - 1


def _unbound(idxs: list[Any]) -> list[Any]:
    """The index mapping past an unbind of the channels themselves: no index goes on, either way."""
    return []


def unbound_channels(dg: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> None:
    """Unbinds of the channels themselves, cut off from the channels of the tensors they make.

    CSATv2's spatial attention unbinds the three channels of ``qkv = Linear(1, 3)`` (``q, k, v =
    qkv.unbind(-1)``, each ``(B, N)``), and the product of ``v`` with the attention, unsqueezed, is a 1-channel
    stream again. torch-pruning maps unbinds along dim 0 only (a fused qkv reshaped to ``(3, B, heads, N, d)``)
    and passed the others' indices through as they were: qkv's three channels were read as the stream's one,
    and every probe of that group failed (it cut the stream's 1-channel convolution at index 1 or 2). Where an
    unbind along dim 1 or the last dim (given as -1 or by its number) splits a tensor as wide there as torch-pruning
    counts its channels, each channel becomes a tensor of its own: the unbind is marked ``unbinds_channels`` (the
    group that reaches it is left out, regrow.structural.graph) and its edges to and from its results map no
    index. An unbind along any other dimension keeps passing the channels through.
    """
    for node in dg.module2node.values():
        fn = node.grad_fn
        if node.type != ops.OPTYPE.UNBIND or fn is None or not fn.next_functions:
            continue
        dim, shape = _saved_dim(fn), outputs.get(fn.next_functions[0])
        if not dim or shape is None:
            continue
        at = dim % len(shape)  # an unbind's results are read as they are: the last dim, however it is written
        if at not in (1, len(shape) - 1) or shape[at] != channels_in(dg, node):
            continue
        node.module.unbinds_channels = True
        for result in node.outputs:
            for dep in [*node.dependencies, *result.dependencies]:
                if {dep.source, dep.target} == {node, result}:
                    dep.index_mapping[0] = _unbound


def concats_past_channels(dg: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> None:
    """Concatenations along a dimension that holds no channels, made element-wise for torch-pruning.

    A concatenation along neither dim 1 (channels first) nor the last dimension (channels last), such as the
    key/value cache's ``torch.cat([past, new], dim=-2)`` over ``(batch, heads, tokens, head_dim)``, passes every
    channel through to the same channel; torch-pruning maps such a concatenation not at all, as intended, but
    autograd saves a negative ``dim`` unsigned, torch-pruning read ``-2`` as 18446744073709551614 and took it for
    a concatenation of channels, and failed on the widths of inputs that are not in the graph (GPT-2's cache:
    "unsupported operand type(s) for +: 'int' and 'NoneType'"). Concatenations along dim 1 or the last dimension
    are left as they were.
    """
    for node in list(dg.module2node.values()):
        if node.type != ops.OPTYPE.CONCAT:
            continue  # other ops save a dim too, some as a tuple (a sum over several)
        dim, out = _saved_dim(node.grad_fn), outputs.get((node.grad_fn, 0))
        if dim is None or dim >= 0 or out is None or len(out) < 3:
            continue
        if dim % len(out) not in (1, len(out) - 1):
            _retype(node)
