"""Marks regrow's stand-ins put on tensors they compute, where the shapes cannot tell the trace which dimension
holds the channels.

The trace reads a model's layout off the shapes of its tensors (regrow.structural.tracing), and where two
dimensions are as long it has to guess. EfficientViT's cascaded attention (regrow.structural.map_attention) is
such a place: in its last stage at 224 px (its first at 64 px) a window holds as many tokens as each head has key
channels, 16, and its values are as wide again. A stand-in that knows its layout marks the autograd node of the
tensor it computes (its ``metadata``, which lives as long as the node), and the trace reads the mark:

* :func:`channel_free`: attention scores, tokens by tokens, hold no channel; what reads them is cut loose from
  them (regrow.structural.operands.untie_channel_free), where the scores' bias table, which every head gathers
  from, tied each head's queries to the others' and, through a flatten read the wrong way, to the stream;
* :func:`same_channels`: a view of a channels-first map, ``(B, C, H, W)`` into ``(B, C, H*W)`` and back, keeps
  channel ``c`` at ``c`` (regrow.structural.tracing), where torch-pruning read a flatten by the width of some
  tensor further on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

NO_CHANNELS = "regrow.no_channels"
SAME_CHANNELS = "regrow.same_channels"


_reading = False  # True while regrow's trace runs the model (reading)


@contextmanager
def reading() -> Iterator[None]:
    """Marks are made inside this block only: regrow's trace (regrow.structural.graph) runs the model in it. Any
    other forward pass (training, evaluation, under torch.compile, where reading the autograd node would break the
    compiled graph in two) marks nothing."""
    global _reading
    before, _reading = _reading, True
    try:
        yield
    finally:
        _reading = before


def is_reading() -> bool:
    """Whether regrow's trace is running the model now (inside :func:`reading`). A stand-in whose fast form the trace
    cannot follow computes the same function in a form it can, there only (regrow.structural.map_attention.
    MultiScaleLinearAttention); every other pass, the checks of a shrunk model included, runs the fast form."""
    return _reading


def _mark(t: Tensor, mark: str) -> Tensor:
    if _reading and t.grad_fn is not None:  # a forward without autograd has no node to mark
        t.grad_fn.metadata[mark] = True
    return t


def channel_free(scores: Tensor) -> Tensor:
    """``scores``, marked as holding no channel (module docstring)."""
    return _mark(scores, NO_CHANNELS)


def same_channels(view: Tensor) -> Tensor:
    """``view`` (of a channels-first map, its channels kept in dim 1), marked as keeping them (module docstring)."""
    return _mark(view, SAME_CHANNELS)


def marked(node: Any, mark: str) -> bool:
    """Whether the trace's ``node`` computes a tensor marked with ``mark``."""
    return node.grad_fn is not None and bool(node.grad_fn.metadata.get(mark))
