"""Reference models used by the demo, tests, examples and benchmarks (no torchvision needed)."""

from __future__ import annotations

from collections.abc import Callable

import torch
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


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-style CNN for small grey images: a conv stem, three stages of residual blocks, a classifier."""

    def __init__(
        self, width: int = 32, blocks: tuple[int, ...] = (2, 2, 2), num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for stage, count in enumerate(blocks):
            cout = width * 2**stage
            for i in range(count):
                layers.append(BasicBlock(cin, cout, stride=2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm -> multi-head attention -> residual, LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT-style encoder for 28x28 grey images: patch embedding, class token, learned positions."""

    def __init__(
        self,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int = 4,
        image_size: int = 28,
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register("resnet")
def resnet(
    width: int = 32, blocks: tuple[int, ...] = (2, 2, 2), num_classes: int = 10, in_channels: int = 1
) -> nn.Module:
    """ResNet-style CNN with BatchNorm and residual blocks for 28x28 grey images (widths w, 2w, 4w)."""
    return ResNet(width, tuple(blocks), num_classes, in_channels)


@MODELS.register("vit")
def vit(
    dim: int = 64, depth: int = 4, heads: int = 4, patch: int = 4, image_size: int = 28, num_classes: int = 10
) -> nn.Module:
    """Small ViT-style encoder (nn.MultiheadAttention, LayerNorm) for grey images (28x28 by default)."""
    return ViT(dim, depth, heads, patch, image_size, num_classes)


@MODELS.register("gpt")
def gpt(vocab: int = 256, dim: int = 192, depth: int = 4, heads: int = 6, context: int = 64) -> nn.Module:
    """Small decoder-only language model (causal attention with prunable heads; bytes by default)."""
    from regrow.models.gpt import GPT

    return GPT(vocab, dim, depth, heads, context)


HF_TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}


@MODELS.register("hf")
def hf(
    path: str, task: str = "causal-lm", attn_implementation: str = "eager", num_labels: int | None = None
) -> nn.Module:
    """A Hugging Face model folder (``config.json`` and weights, as ``save_pretrained`` writes it), loaded with
    ``from_pretrained`` from local files only: regrow never downloads. ``path``: a folder, or
    ``"package:NAME/folder"`` inside an installed Python package. ``task``: causal-lm, encoder, masked-lm
    or sequence-classification (with ``num_labels``)."""
    from regrow.errors import RegrowError, one_of

    if task not in HF_TASKS:
        raise one_of("hf model task", task, tuple(HF_TASKS))
    from regrow.data.text import local_folder

    folder = local_folder(path)
    if not (folder / "config.json").is_file():
        raise RegrowError(
            f"model 'hf' needs a Hugging Face model folder holding config.json and the weights (as save_pretrained "
            f"writes it); {str(folder)!r} has no config.json. regrow loads local files only, never from the Hub."
        )
    try:
        import transformers
    except ImportError:
        raise RegrowError("model 'hf' needs the transformers package: pip install transformers.") from None
    kwargs: dict = {"local_files_only": True, "attn_implementation": attn_implementation}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        return getattr(transformers, HF_TASKS[task]).from_pretrained(str(folder), **kwargs).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegrowError(
            f"the Hugging Face model in {str(folder)!r} could not be loaded as {task!r}: {first}"
        ) from None


__all__ = ["HF_TASKS", "MODELS", "ResNet", "ViT", "digits_cnn", "gpt", "hf", "lenet_300_100", "mlp", "resnet", "vit"]
