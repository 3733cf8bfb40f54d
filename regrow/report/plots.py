"""Plots for reports (matplotlib, imported lazily, drawn off-screen)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from regrow.io import atomic_write


def plot_curve(history: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "recovery") -> Path:
    """Validation (and training) accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(epochs, [100 * h["val_accuracy"] for h in history], marker="o", label="validation")
    train = [(h["epoch"], 100 * h["train_accuracy"]) for h in history if h.get("train_accuracy") is not None]
    if train:
        ax.plot(*zip(*train), marker=".", linestyle="--", label="train (running, augmented)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
