"""Built-in batch augmentations for recovery (and baseline) training.

Augmentation is the first guard against over-fitting a small fine-tuning set: the pruned model sees a
slightly different version of each example every epoch. A recipe names one of these, or its own
``"package.module:function"`` that maps an input batch to an augmented batch of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from regrow.errors import RegrowError
from regrow.registry import Registry

AUGMENTS: Registry[Callable[[Tensor], Tensor]] = Registry("augment")


@AUGMENTS.register("shift")
def shift(x: Tensor, pixels: int = 1) -> Tensor:
    """Images (N, C, H, W): move each image by a random whole number of pixels in [-1, 1] per axis."""
    if x.dim() != 4:
        raise RegrowError(
            f"augment 'shift' moves images and needs batches shaped (N, C, H, W); got shape {tuple(x.shape)}. "
            "Use 'noise' for other inputs, or no augmentation."
        )
    n, _, h, w = x.shape
    offsets = torch.randint(-pixels, pixels + 1, (n, 2), device=x.device).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * offsets[:, 0] / w
    theta[:, 1, 2] = 2.0 * offsets[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # whole-pixel offsets with nearest sampling move pixels exactly; borders repeat the edge pixel
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


@AUGMENTS.register("noise")
def noise(x: Tensor, std: float = 0.1) -> Tensor:
    """Any input: add Gaussian noise with standard deviation 0.1 (in the units of the normalised input)."""
    return x + std * torch.randn_like(x)


@AUGMENTS.register("hflip")
def hflip(x: Tensor) -> Tensor:
    """Images (N, C, H, W): mirror half of the batch left-right at random (not for digits or text)."""
    if x.dim() != 4:
        raise RegrowError(
            f"augment 'hflip' mirrors images and needs batches shaped (N, C, H, W); got shape {tuple(x.shape)}."
        )
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
