"""Carving a validation split out of training data, for early stopping and checkpoint choice."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, random_split

from regrow.errors import RegrowError


def split_validation(train: Iterable[Any], fraction: float = 0.1, seed: int = 0) -> tuple[Iterable[Any], Iterable[Any]]:
    """Split ``train`` into (train, val).

    * A DataLoader over a sized dataset: a seeded random split of the samples; both new loaders keep the
      batch size, collate function and worker count (the training one shuffles).
    * A list or other sized sequence of batches: the last ``fraction`` of the batches (at least one).
    """
    if isinstance(train, DataLoader) and hasattr(train.dataset, "__len__"):
        if train.batch_size is None:
            raise RegrowError(
                "no validation data was given and the training DataLoader uses its own batch sampler, which "
                "regrow cannot split; pass val= explicitly."
            )
        n = len(train.dataset)  # type: ignore[arg-type]
        n_val = max(1, round(fraction * n))
        if n - n_val < 1:
            raise RegrowError(f"the training data has only {n} samples; too few to carve a validation split.")
        gen = torch.Generator().manual_seed(seed)
        train_set, val_set = random_split(train.dataset, [n - n_val, n_val], generator=gen)
        common = {
            "batch_size": train.batch_size,
            "collate_fn": train.collate_fn,
            "num_workers": train.num_workers,
            "pin_memory": train.pin_memory,
        }
        return (
            DataLoader(
                train_set,
                shuffle=True,
                drop_last=train.drop_last,
                generator=torch.Generator().manual_seed(seed),
                **common,
            ),
            DataLoader(val_set, shuffle=False, **common),
        )
    if hasattr(train, "__len__") and hasattr(train, "__getitem__"):
        batches = list(train)
        if len(batches) < 2:
            raise RegrowError(
                "no validation data was given and the training data has fewer than 2 batches to split; "
                "pass val= explicitly."
            )
        n_val = max(1, round(fraction * len(batches)))
        return batches[:-n_val], batches[-n_val:]
    raise RegrowError(
        "no validation data was given and the training data cannot be split (it is neither a DataLoader "
        "over a sized dataset nor a list of batches); pass val= explicitly."
    )
