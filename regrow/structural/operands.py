"""Which operands of a matrix product or a broadcasting element-wise op pass their channels to its result.

torch-pruning reads every operation it has no rule for as element-wise: channel ``c`` of each input is channel
``c`` of the output and of every other input. Two kinds of operation break that:

* a **batched matrix product** ``a @ b`` of ``(B, n, k)`` by ``(B, k, p)`` whose ``a`` holds its channels first,
  in ``n``: those are the product's channels, and no channel of ``b`` is one (its ``k`` meets a dimension of
  ``a`` that holds no channel, its ``p`` lands in one of the product's). EfficientViM's state-space mixer, ``x
  @ ab.transpose(-2, -1)`` with ``x`` the ``(B, C, H*W)`` feature map and ``ab`` a ``(B, state, H*W)`` gate,
  tied the feature map's channels to the state's and, through the flattens of the gate's convolutions, to
  indices far past any width: every group of the model's wider stages was left out, and the budget was missed
  (0.55 for 0.5). torch-pruning also counts a product's channels as those of whichever operand it met last, so
  the reshapes after it were read as flattens of ``b``'s width. :func:`channels_first_products` makes ``a`` that
  operand; :func:`untie_products` cuts ``b`` loose once the mappings are computed. A product whose ``a`` may hold
  its channels last (attention's ``q @ k.transpose(-2, -1)``, which ties ``q``'s channels to ``k``'s) stays as
  torch-pruning reads it.
* an **operand broadcast across the channels**, one channel wide where the result has many (FocalNet's ``ctx *
  gates[:, l:l + 1]``, one gate for every channel of the context): its one channel is no channel of the result.
  torch-pruning tied it to channel 0 of the context, so the gates went with the context's first channel and
  every probe of the modulation's projection failed (:func:`untie_broadcast_operands`).
"""

from __future__ import annotations

from typing import Any

from torch_pruning import ops
from torch_pruning.dependency import shape_infer

from regrow.structural.marks import NO_CHANNELS, marked

ARITHMETIC = {"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"}


def _channels(dg: Any, node: Any) -> int | None:
    """torch-pruning's count of the channels ``node`` outputs; None where it has none or cannot tell."""
    try:
        return shape_infer.infer_out_channels_recursively(dg, node, [0])
    except (IndexError, ZeroDivisionError, TypeError):
        return None


def channels_first_products(dg: Any) -> list[tuple[Any, Any]]:
    """Every batched matrix product whose first operand ``a`` holds its channels first, as ``(product, b)``, with
    ``a`` made the product's last input: the one torch-pruning's count of the product's channels ends on."""
    found = []
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if fn is None or fn.name() != "BmmBackward0" or len(fn.next_functions) != 2:
            continue
        a, b = (next((n for n in node.inputs if n.grad_fn is f), None) for f, _ in fn.next_functions)
        if a is None or b is None or a is b:
            continue
        try:
            shape = fn._saved_self.shape
        except RuntimeError:  # the saved operand was freed (a graph that backward ran through): no shape to read
            continue
        if _channels(dg, a) == shape[1] != shape[2]:
            node.inputs.remove(a)
            node.inputs.append(a)
            found.append((node, b))
    return found


def untie_channel_free(dg: Any) -> None:
    """Cut what reads a tensor marked as holding no channel (regrow.structural.marks.channel_free) loose from
    it."""
    for node in list(dg.module2node.values()):
        if marked(node, NO_CHANNELS):
            for reader in node.outputs:
                _cut(reader, node)


def _cut(node: Any, operand: Any) -> None:
    """No index maps between ``node`` and its input ``operand``, either way."""
    for dep in operand.dependencies:
        if dep.target is node:
            dep.index_mapping[0] = _none
    for dep in node.dependencies:
        if dep.target is operand:
            dep.index_mapping[0] = _none


def _none(idxs: list[Any]) -> list[Any]:
    """The index mapping that maps nothing (here and in regrow.structural.tracing)."""
    return []


def untie_products(products: list[tuple[Any, Any]]) -> None:
    """Cut each product's ``b`` loose (:func:`channels_first_products`)."""
    for node, b in products:
        _cut(node, b)


def untie_broadcast_operands(dg: Any, shapes: dict[Any, tuple[int, ...]]) -> None:
    """Cut loose every operand of an addition, subtraction, product or quotient that is broadcast across the
    channels: as many dimensions as the result, all as long but one, dim 1 or the last, where it is 1 and the
    result as wide as the channels its other operands carry (and no other dimension of the result is)."""
    for node in list(dg.module2node.values()):
        fn = node.grad_fn
        if node.type != ops.OPTYPE.ELEMENTWISE or fn is None or fn.name() not in ARITHMETIC:
            continue
        out = shapes.get(fn)
        if out is None or len(node.inputs) < 2:
            continue
        for operand in list(node.inputs):
            shape = shapes.get(operand.grad_fn) if operand.grad_fn is not None else None
            if shape is None or len(shape) != len(out):
                continue
            dims = [d for d in range(len(out)) if shape[d] != out[d]]
            if len(dims) != 1 or shape[dims[0]] != 1 or dims[0] not in (1, len(out) - 1) or out.count(out[dims[0]]) > 1:
                continue
            if {_channels(dg, other) for other in node.inputs if other is not operand} == {out[dims[0]]}:
                _cut(node, operand)
