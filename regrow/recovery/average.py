"""An exponential moving average of the weights during recovery (``recover(..., ema=decay)``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from regrow.masks import MaskSet
from regrow.measure.cost import storage_key, unique_tensors


class WeightAverage:
    """An exponential moving average of the weights (Polyak & Juditsky 1992).

    An average of the last steps of training tends to sit in a flatter, better-generalising point than the
    last step alone (cf. Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"); with a learning
    rate annealed to zero the last steps barely move, and the average is close to the last weights. It
    costs one more copy of the weights in memory (two while validating), kept in float32 for half-precision
    weights, whose rounding would swallow updates of ``1 - decay`` times a small difference.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` (the ``num_updates`` rule of TensorFlow's
    ``ExponentialMovingAverage``) so that the first steps, far from where training ends, fade fast; it
    reaches ``decay`` after about ``9 / (1 - decay)`` steps (9,000 for 0.999). After every update the average
    of each target is multiplied by its current mask, so the average is exactly as sparse as the trained
    weights, also while gradual pruning or dynamic sparsity move the masks; a weight regrown by dynamic
    sparsity enters the average from zero and weighs fully only some ``1 / (1 - decay)`` steps later. A
    tied tensor is averaged once, whichever of its names the masks use. Floating-point buffers (e.g.
    batch-norm statistics) are averaged too; integer buffers are not.
    """

    def __init__(self, model: nn.Module, masks: MaskSet, decay: float) -> None:
        self.decay = decay
        self.masks = masks
        tensors = unique_tensors(model)  # a tied tensor once, under its first name
        # Views of the model's own tensors, which training updates in place: no state dict per step.
        self.live = {k: v.detach() for k, v in tensors.items() if v.is_floating_point()}
        self.average = {
            k: v.clone().float() if v.dtype in (torch.float16, torch.bfloat16) else v.clone()
            for k, v in self.live.items()
        }
        name_of = {storage_key(t): k for k, t in tensors.items()}
        self.masked = {name_of[storage_key(model.get_parameter(fqn))]: fqn for fqn in masks.keys()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, avg in self.average.items():
            avg.lerp_(self.live[name].to(avg.dtype), 1.0 - decay)
        for name, fqn in self.masked.items():
            self.average[name].mul_(self.masks[fqn])

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its trained weights again after it."""
        trained = {k: v.clone() for k, v in self.live.items()}
        model.load_state_dict(self.average, strict=False)  # cast back to the model's dtypes on copy
        try:
            yield
        finally:
            model.load_state_dict(trained, strict=False)
