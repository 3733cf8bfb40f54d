"""Weight sharing (Han et al. 2016, "Deep Compression"): each target's surviving weights take k values.

The surviving (unmasked) weights of each target are clustered with 1-D k-means (linear initialisation
between the smallest and largest weight, as in the paper); every weight then holds its cluster's value.
During fine-tuning the gradients of a cluster's weights are summed and applied to all of them, so they
stay exactly equal: the shared values are what trains. The export is an index per surviving weight
(``ceil(log2 k)`` bits) plus a codebook of k float32 values per target.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from regrow.io import atomic_write
from regrow.masks import MaskSet

if TYPE_CHECKING:
    from regrow.recovery.records import TrainState


def kmeans_1d(values: Tensor, k: int, iterations: int = 30) -> tuple[Tensor, Tensor]:
    """(codebook of k values, index of each value) by Lloyd's algorithm from a linear initialisation.

    Empty clusters are re-seeded on the value farthest from its centroid.
    """
    values = values.detach().float()
    k = max(1, min(k, values.numel()))
    lo, hi = float(values.min()), float(values.max())
    codebook = torch.linspace(lo, hi, k, device=values.device)
    for _ in range(iterations):
        distance = (values[:, None] - codebook[None, :]).abs()
        index = distance.argmin(dim=1)
        sums = torch.zeros(k, device=values.device).index_add_(0, index, values)
        counts = torch.zeros(k, device=values.device).index_add_(0, index, torch.ones_like(values))
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
        # An empty cluster is moved onto the value worst served by its centroid, so no code is wasted.
        worst = distance.gather(1, index[:, None]).squeeze(1).clone()
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = int(worst.argmax())
            if worst[far] <= 0:
                break
            updated[c] = values[far]
            worst[far] = 0.0
        if torch.allclose(updated, codebook):
            break
        codebook = updated
    index = (values[:, None] - codebook[None, :]).abs().argmin(dim=1)
    return codebook, index


def index_width(values: int) -> int:
    """Bits of an index into a codebook of ``values`` entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(values, 1))))


@dataclass
class SharedWeights:
    """Cluster indices (``-1`` where pruned) and codebooks per target."""

    k: int
    indices: dict[str, Tensor] = field(default_factory=dict)
    codebooks: dict[str, Tensor] = field(default_factory=dict)

    def values(self) -> int:
        """The most shared values any target has: ``k``, or fewer where fewer weights survive."""
        return max((c.numel() for c in self.codebooks.values()), default=0)

    def bits(self) -> int:
        """Storage in bits: surviving indices (``ceil(log2)`` of the target's codebook size each), codebooks
        (float32) and the sparsity bitmask."""
        total = 0
        for fqn, idx in self.indices.items():
            index_bits = index_width(self.codebooks[fqn].numel())
            total += int((idx >= 0).sum()) * index_bits + self.codebooks[fqn].numel() * 32 + idx.numel()
        return total

    def save(self, path: str | os.PathLike[str]) -> None:
        n = self.values()
        dtype = torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32
        tensors = {}
        for fqn, idx in self.indices.items():
            tensors[f"{fqn}.indices"] = idx.clamp(min=0).to(dtype).cpu().contiguous()
            tensors[f"{fqn}.mask"] = (idx >= 0).cpu().contiguous()
            tensors[f"{fqn}.codebook"] = self.codebooks[fqn].float().cpu().contiguous()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "regrow.shared", "k": str(self.k)}))


@torch.no_grad()
def share(model: nn.Module, masks: MaskSet, k: int, targets: list[str] | None = None) -> SharedWeights:
    """Cluster each target's surviving weights into ``k`` values, in place."""
    shared = SharedWeights(k)
    for fqn in targets if targets is not None else list(masks):
        param = model.get_parameter(fqn)
        mask = masks[fqn].to(param.device) if fqn in masks.masks else torch.ones_like(param, dtype=torch.bool)
        alive = param[mask]
        index = torch.full(param.shape, -1, dtype=torch.long, device=param.device)
        if alive.numel() == 0:
            shared.indices[fqn], shared.codebooks[fqn] = index, torch.zeros(0, device=param.device)
            continue
        codebook, idx = kmeans_1d(alive, k)
        index[mask] = idx
        param[mask] = codebook[idx].to(param.dtype)
        shared.indices[fqn], shared.codebooks[fqn] = index, codebook
    return shared


@dataclass
class WeightSharing:
    """Recovery callback: cluster at the start, then train the shared values (summed gradients)."""

    k: int = 16
    shared: SharedWeights | None = None

    def on_train_start(self, state: TrainState) -> None:
        targets = list(state.masks) or _default_targets(state.model)
        self.shared = share(state.model, state.masks, self.k, targets)

    @torch.no_grad()
    def on_after_backward(self, state: TrainState) -> None:
        assert self.shared is not None
        for fqn, index in self.shared.indices.items():
            param = state.model.get_parameter(fqn)
            if param.grad is None:
                continue
            alive = index >= 0
            sums = torch.zeros(self.shared.codebooks[fqn].numel(), device=param.device, dtype=param.grad.dtype)
            sums.index_add_(0, index[alive], param.grad[alive])
            param.grad[alive] = sums[index[alive]]

    def on_step_end(self, state: TrainState) -> None:
        # Weights of a cluster received identical updates; snap them to their mean against float drift and
        # keep the codebook in step.
        self.sync(state.model)

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Codebooks := cluster means of the model's weights, and every weight := its cluster's value."""
        assert self.shared is not None
        for fqn, index in self.shared.indices.items():
            param = model.get_parameter(fqn)
            alive = index >= 0
            if not alive.any():
                continue
            k = self.shared.codebooks[fqn].numel()
            sums = torch.zeros(k, device=param.device).index_add_(0, index[alive], param[alive].float())
            ones = torch.ones_like(param[alive], dtype=torch.float)
            counts = torch.zeros(k, device=param.device).index_add_(0, index[alive], ones)
            codebook = torch.where(counts > 0, sums / counts.clamp(min=1), self.shared.codebooks[fqn])
            self.shared.codebooks[fqn] = codebook
            param[alive] = codebook[index[alive]].to(param.dtype)

    def checkpoint_ready(self, state: TrainState) -> bool:
        return True


def _default_targets(model: nn.Module) -> list[str]:
    from regrow.select import default_targets

    return default_targets(model)


def sizes(model: nn.Module, masks: MaskSet, shared: SharedWeights | None) -> dict[str, Any]:
    """Bits of the targets stored dense (float32), sparse (bitmask + float32 values) and shared."""
    dense = sparse = 0
    for fqn in shared.indices if shared else list(masks):
        p = model.get_parameter(fqn)
        dense += p.numel() * 32
        sparse += int(torch.count_nonzero(p)) * 32 + p.numel()
    return {
        "dense_bits": dense,
        "sparse_bits": sparse,
        "shared_bits": shared.bits() if shared else None,
        "k": shared.k if shared else None,
        "values": shared.values() if shared else None,
        "index_bits": index_width(shared.values()) if shared else None,
    }
