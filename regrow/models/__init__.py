"""Reference models used by the demo, tests, examples and benchmarks (no torchvision needed)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from regrow.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


@MODELS.register("digits_cnn")
def digits_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """Small CNN for 1x8x8 images: two 3x3 conv blocks, a hidden Linear layer, a classifier."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(2 * width * 16, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@MODELS.register("lenet_300_100")
def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """LeNet-300-100 MLP (784-300-100-10), the unstructured-pruning benchmark of Han et al. 2015."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@MODELS.register("mlp")
def mlp(in_features: int = 64, hidden: int = 128, depth: int = 2, num_classes: int = 10) -> nn.Module:
    """A plain ReLU MLP: `depth` hidden layers of width `hidden`, then a classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


__all__ = ["MODELS", "digits_cnn", "lenet_300_100", "mlp"]
