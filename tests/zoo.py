"""Tiny models covering every layer type and coupling that structural pruning handles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualCNN(nn.Module):
    """Conv + BatchNorm residual chain with a strided 1x1 shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = F.relu(self.down(x) + self.short(x))
        return self.fc(x.mean((2, 3)))


class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.act = nn.PReLU(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.act(self.pw(F.relu6(self.dw_bn(self.dw(x)))))
        return self.fc(x.mean((2, 3)))


class GroupedNorms(nn.Module):
    """Grouped convolution, GroupNorm and InstanceNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(32, affine=True)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 32)
        self.c3 = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.inorm(self.c1(x)))
        x = F.relu(self.gn(self.g(x)))
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


class DenseConcat(nn.Module):
    """DenseNet-style: each layer's output is concatenated to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(14), nn.ReLU(), nn.Conv2d(14, 6, 3, padding=1))
        self.out = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 8, 1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c0(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.fc(self.out(x).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an NCHW map, written as timm's ConvNeXt and RDNet write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DenseLayerNorm(DenseConcat):
    """RDNet-style: a LayerNorm over a concatenation normalises the channels of several groups at once."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.c0 = nn.Conv2d(1, 8, 3, padding=1)
        self.l1 = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 6, 3, padding=1), nn.GELU())
        self.l2 = nn.Sequential(LayerNorm2d(14), nn.Conv2d(14, 6, 3, padding=1), nn.GELU())
        self.out = nn.Sequential(LayerNorm2d(20), nn.Conv2d(20, 8, 1))
        self.fc = nn.Linear(8, 3)


class StdConv2d(nn.Conv2d):
    """As timm's ScaledStdConv2d (NFNet): each filter standardised over its inputs, scaled by a gain of its own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5  # of the layer as built, as timm's keeps it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WeightStandardized(nn.Module):
    """NFNet / BiT style: weight-standardised convolutions around a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(1, 8, 3, padding=1)
        self.c1 = StdConv2d(8, 24, 3, padding=1)
        self.c2 = StdConv2d(24, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.c2(F.relu(self.c1(x)))
        return self.fc(x.mean((2, 3)))


class FusedAttention(nn.Module):
    """A custom attention module that declares its head count (timm style)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, norm: type, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.n1, self.n2 = norm(dim), norm(dim)
        self.attn = FusedAttention(dim, heads) if fused else nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + (self.attn(h) if self.fused else self.attn(h, h, h, need_weights=False)[0])
        return x + self.mlp(self.n2(x))


class TinyTransformer(nn.Module):
    """Token embedding, learned positions, two pre-norm blocks, a mean-pooled classifier."""

    def __init__(self, norm: type = nn.LayerNorm, fused: bool = False, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, dim)
        self.pos = nn.Parameter(torch.randn(1, 6, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim, heads, norm, fused) for _ in range(2)])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def images(n: int = 4, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def tokens(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 50, (n, 6), generator=torch.Generator().manual_seed(0))


CNNS = {
    "residual": ResidualCNN,
    "depthwise": DepthwiseSeparable,
    "grouped_norms": GroupedNorms,
    "concat": DenseConcat,
    "concat_layernorm": DenseLayerNorm,
    "weight_standardized": WeightStandardized,
}
TRANSFORMERS = {
    "layernorm": lambda: TinyTransformer(nn.LayerNorm),
    "rmsnorm": lambda: TinyTransformer(nn.RMSNorm),
    "fused_attention": lambda: TinyTransformer(nn.LayerNorm, fused=True),
}
