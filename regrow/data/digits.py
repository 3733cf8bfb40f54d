"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from regrow.data.bundle import DATASETS, DataBundle, select_classes


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


@DATASETS.register("digits")
def digits(
    batch_size: int = 64,
    test_fraction: float = 0.2,
    val_fraction: float = 0.15,
    seed: int = 0,
    flatten: bool = False,
    classes: list[int] | None = None,
) -> DataBundle:
    """scikit-learn 8x8 digits: stratified held-out test split, validation carved from the rest.

    ``classes`` keeps only those digits, relabelled 0..len(classes)-1 in the given order (for transfer).
    """
    from sklearn.model_selection import train_test_split

    x, y = load_digits_arrays()
    if classes is not None:
        x, y = select_classes(x, y, classes, 10)
    x = (x - 0.5) / 0.5  # centre the [0, 1] pixel range
    x = x.reshape(len(x), -1) if flatten else x[:, None, :, :]
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction, stratify=y_rest, random_state=seed
    )

    def loader(xs: np.ndarray, ys: np.ndarray, shuffle: bool) -> DataLoader:
        ds = TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys))
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None)

    return DataBundle(
        train=loader(x_train, y_train, True),
        val=loader(x_val, y_val, False),
        test=loader(x_test, y_test, False),
        num_classes=10 if classes is None else len(classes),
        description=f"sklearn digits 8x8{'' if classes is None else f' classes {list(classes)}'}: "
        f"{len(y_train)} train / {len(y_val)} val / {len(y_test)} test",
    )
