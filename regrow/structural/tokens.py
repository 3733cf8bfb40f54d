"""Linear layers over a sequence's tokens (MLP-Mixer's token MLP, ResMLP's token Linear, gMLP's spatial gating).

A token-mixing block transposes its ``(B, N, C)`` input to ``(B, C, N)``, applies Linear layers over the ``N``
tokens, and transposes back: ``mlp_tokens(norm1(x).transpose(1, 2)).transpose(1, 2)``. Each channel is mixed
across tokens on its own, so for the channels the block is element-wise: channel ``c`` of its output is computed
from channel ``c`` of its input only. torch-pruning treats a transpose as element-wise and every Linear as
reading channels, so it coupled the stream's channels with the token Linear's inputs and outputs, and the
stream's group failed its probe (``mat1 and mat2 shapes cannot be multiplied``) and was left out.

:func:`pass_channels_around` rewires the traced graph before torch-pruning builds its dependencies: the transpose
into such a block feeds the transpose out of it directly, and the Linear layers between them are no longer joined
to the channels. Their own widths stay as they are: their inputs and outputs are the tokens, whose number cannot
change, and only a hidden width between two of them (the token MLP's) is a group of its own.

A ``Conv1d`` with a kernel of one over vectors stacked along dim 1 (CoaT's head, which mixes the class tokens of its
three scales into one) is the same thing without the transposes: :func:`stacked_mixers` rewires it alike.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch_pruning import ops

from regrow.structural.tracing import _signed, channels_in

REGION_LIMIT = 64  # nodes between the two transposes: a token MLP has about a dozen


def _permutation(fn: Any, rank: int) -> list[int] | None:
    """``perm`` of a transpose or permute's autograd node (output dim ``i`` is input dim ``perm[i]``), else None."""
    name = fn.name() if fn is not None and hasattr(fn, "name") else ""
    if name.startswith("TransposeBackward") and hasattr(fn, "_saved_dim0"):
        perm = list(range(rank))
        a, b = (_dim(getattr(fn, f"_saved_dim{i}"), rank) for i in (0, 1))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name.startswith("PermuteBackward") and hasattr(fn, "_saved_dims"):
        return [_dim(d, rank) for d in fn._saved_dims]
    return None


def _dim(value: int, rank: int) -> int:
    return _signed(int(value)) % rank  # autograd saves a negative dim as unsigned 64-bit


def _shape(node: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> tuple[int, ...] | None:
    return outputs.get((node.grad_fn, 0)) if node.grad_fn is not None else None


def _region(start: Any, perm: list[int]) -> tuple[set[Any], Any] | None:
    """The nodes after ``start`` (the transpose into the block) up to the one transpose that undoes it, and that
    transpose; None where anything else leaves or enters between them, or where anything but Linear layers,
    element-wise ops and reshapes sits there."""
    inside: set[Any] = set()
    exits: set[Any] = set()
    stack = list(start.outputs)
    while stack:
        node = stack.pop()
        if node in inside or node in exits:
            continue
        fn_perm = _permutation(node.grad_fn, len(perm))
        if fn_perm is not None and [perm[i] for i in fn_perm] == list(range(len(perm))):
            exits.add(node)
            continue
        allowed = node.type in (ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.RESHAPE) or isinstance(node.module, nn.Linear)
        if not allowed or len(inside) >= REGION_LIMIT:
            return None
        inside.add(node)
        stack.extend(node.outputs)
    if len(exits) != 1 or not any(isinstance(n.module, nn.Linear) for n in inside):
        return None
    (end,) = exits
    for node in [*inside, end]:  # nothing enters but the block's input and what has no input itself (weights)
        if any(i is not start and i not in inside and i.inputs for i in node.inputs):
            return None
    return inside, end


def _nearest_linears(edge: Any, inside: set[Any], forward: bool) -> list[nn.Linear]:
    """The Linear layers inside the block nearest to ``edge`` (one of its two transposes), with no other Linear
    between: those that read the transposed input (``forward``), or those whose outputs reach the transpose out."""
    found, seen = [], set()
    stack = [n for n in (edge.outputs if forward else edge.inputs) if n in inside]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, nn.Linear):
            found.append(node.module)
            continue
        stack.extend(n for n in (node.outputs if forward else node.inputs) if n in inside)
    return found


def pass_channels_around(dg: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> set[nn.Module]:
    """Rewire every token-mixing block of ``dg``'s traced graph (see the module's docstring); returns the Linear
    layers whose outputs are the block's tokens. A transpose qualifies when its input holds the channels in its
    last dimension (as wide as the channels torch-pruning counts there, and not as wide as the dimension it brings
    last, where the two could not be told apart), and the Linear layers after it read that dimension."""
    token_outputs: set[nn.Module] = set()
    for node in list(dg.module2node.values()):
        out_shape = _shape(node, outputs)
        perm = _permutation(node.grad_fn, len(out_shape)) if out_shape else None
        if perm is None or not node.inputs:
            continue
        in_shape = [0] * len(perm)
        for i, p in enumerate(perm):
            in_shape[p] = out_shape[i]
        last = len(perm) - 1
        tokens = in_shape[perm[last]]
        if perm[last] == last or tokens == in_shape[last] or channels_in(dg, node) != in_shape[last]:
            continue
        found = _region(node, perm)
        if found is None:
            continue
        inside, end = found
        if not all(layer.in_features == tokens for layer in _nearest_linears(node, inside, forward=True)):
            continue
        _rewire(node, inside, end, token_outputs)
    return token_outputs


def _rewire(start: Any, inside: set[Any], end: Any, token_outputs: set[nn.Module]) -> None:
    token_outputs.update(_nearest_linears(end, inside, forward=False))
    for node in inside:
        node.inputs = [i for i in node.inputs if i is not start]
        node.outputs = [o for o in node.outputs if o is not end]
    start.outputs = [o for o in start.outputs if o not in inside] + [end]
    end.inputs = [i for i in end.inputs if i not in inside] + [start]


def stacked_mixers(dg: Any, outputs: dict[tuple[Any, int], tuple[int, ...]]) -> set[nn.Module]:
    """Rewire every ``Conv1d`` with a kernel of one over a stack of channel vectors, and return them: CoaT's head
    stacks the class tokens of its three scales, ``(B, 3, C)``, and mixes them with ``Conv1d(3, 1, 1)`` into one,
    which it squeezes. The Conv1d's channels are the stacked tensors; theirs lie along its length, each mixed on its
    own. torch-pruning read the stack as element-wise and cut the Conv1d's three inputs by the stream's channels,
    so the streams' group failed its probe (coat_tiny: ``patch_embed2.proj``, "expected input[2, 3, 149] to have 1
    channels") and was left out. The stack now feeds what reads the Conv1d directly, so a channel of the stacked
    tensors is that channel of the mix, and the Conv1d keeps its widths: its one output is no channel of theirs."""
    mixers: set[nn.Module] = set()
    for node in list(dg.module2node.values()):
        conv = node.module
        if not isinstance(conv, nn.Conv1d) or conv.kernel_size != (1,) or conv.groups != 1 or len(node.inputs) != 1:
            continue
        (stack,) = node.inputs
        fn, shape = stack.grad_fn, _shape(stack, outputs)
        if fn is None or fn.name() != "StackBackward0" or shape is None or len(shape) != 3:
            continue
        if _dim(fn._saved_dim, 3) != 1 or shape[1] != conv.in_channels or stack.outputs != [node]:
            continue
        readers = list(node.outputs)
        stack.outputs = readers
        for reader in readers:
            reader.inputs = [stack if i is node else i for i in reader.inputs]
        node.inputs, node.outputs = [], []
        mixers.add(conv)
    return mixers
