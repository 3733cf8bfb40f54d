"""Fashion-MNIST from local IDX files (Xiao et al. 2017; 60k train / 10k test, 28x28 grey, 10 classes).

Nothing is downloaded. By default the files come from the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``, files under ``/usr/share/datasets/fashion-mnist``); give
another folder holding the four IDX files (gzipped or not) with ``root=`` or ``REGROW_FASHION_MNIST``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from regrow.data.bundle import DATASETS, DataBundle, select_classes
from regrow.errors import RegrowError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise RegrowError(f"cannot read IDX file {str(p)!r}: {exc}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise RegrowError(f"{str(p)!r} is not an unsigned-byte IDX file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise RegrowError(f"IDX file {str(p)!r} is truncated.")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise RegrowError(f"IDX file {str(p)!r} holds {len(raw) - header} bytes of data but its header says {count}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_root(root: str | os.PathLike[str] | None = None) -> Path:
    candidate = Path(root or os.environ.get("REGROW_FASHION_MNIST") or DEFAULT_ROOT)
    missing = [name for name in FILES.values() if not _file(candidate, name)]
    if missing:
        raise RegrowError(
            f"Fashion-MNIST IDX files not found in {str(candidate)!r} (missing: {', '.join(missing)}); "
            "install them with 'apt-get install dataset-fashion-mnist', or point root= / "
            "REGROW_FASHION_MNIST at a folder holding the four IDX files."
        )
    return candidate


def _file(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_arrays(root: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    folder = find_root(root)
    return {key: read_idx(_file(folder, name)) for key, name in FILES.items()}  # type: ignore[arg-type]


def available(root: str | os.PathLike[str] | None = None) -> bool:
    try:
        find_root(root)
    except RegrowError:
        return False
    return True


@DATASETS.register("fashion_mnist")
def fashion_mnist(
    batch_size: int = 128,
    val_size: int = 5000,
    train_limit: int | None = None,
    test_limit: int | None = None,
    flatten: bool = False,
    seed: int = 0,
    root: str | None = None,
    classes: list[int] | None = None,
) -> DataBundle:
    """Fashion-MNIST from local IDX files: seeded validation split of the training set, official test set."""
    arrays = load_arrays(root)
    if classes is not None:
        for split in ("train", "test"):
            images, labels = select_classes(arrays[f"{split}_images"], arrays[f"{split}_labels"], classes, 10)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels

    def prep(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        x = (x - MEAN) / STD
        return x.reshape(len(x), -1) if flatten else x.unsqueeze(1)

    x_all, y_all = prep(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64))
    x_test, y_test = prep(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64))
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    if test_limit is not None:
        x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    gen = torch.Generator().manual_seed(seed)
    return DataBundle(
        train=DataLoader(
            TensorDataset(x_all[train_idx], y_all[train_idx]), batch_size=batch_size, shuffle=True, generator=gen
        ),
        val=DataLoader(TensorDataset(x_all[val_idx], y_all[val_idx]), batch_size=512),
        test=DataLoader(TensorDataset(x_test, y_test), batch_size=512),
        num_classes=10 if classes is None else len(classes),
        description=f"Fashion-MNIST{'' if classes is None else f' classes {list(classes)}'}: "
        f"{len(train_idx)} train / {len(val_idx)} val / {len(y_test)} test",
    )
