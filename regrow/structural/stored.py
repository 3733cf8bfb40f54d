"""Widths that an architecture keeps as plain attributes and reads in its forward pass.

A layer handler updates the layer it shrinks (``out_channels``, ``normalized_shape``, ...), but some models
also store a width of their own and reshape with it: torchvision's ``VisionTransformer`` flattens its patch
embedding with ``x.reshape(n, self.hidden_dim, n_h * n_w)``, timm's ReXNet slices its output with
``self.in_channels``, timm's Res2Net and CSPNet split with ``self.width`` and ``self.expand_chs``, its
selective-kernel convolutions (SKNet) with ``self.in_channels // self.num_paths``, its MambaOut with a tuple of
three widths, its EfficientViM with ``self.d_inner`` and its FocalNet with ``self.input_split``, its dual-path
networks (DPN) slice with ``self.num_1x1_c``, its InceptionNeXt and FasterNet blocks split with
``split_indexes`` and ``dim_conv3`` / ``dim_untouched``, which their token mixers store, and MetaFormer's layer
scales view their scale as the ``shape`` they store. Left stale, the attribute breaks the forward pass of the
shrunk model, so every probe of the groups through it failed and they were never pruned. Each entry names the
attribute and the layer width it must equal after surgery; :func:`follow` sets them. Classes are matched by
their qualified name (subclasses too), so the architectures' packages are never imported here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _paths_inputs(module: nn.Module) -> int | None:
    """timm's SelectiveKernel splits its input into one chunk a path: ``torch.split(x, self.in_channels //
    self.num_paths, 1)``; ``in_channels`` is then what its paths read together."""
    paths = getattr(module, "paths", None)
    if not getattr(module, "split_input", False) or paths is None:
        return None
    return sum(path.conv.in_channels for path in paths)


def _gated_conv_splits(module: nn.Module) -> tuple[int, int, int] | None:
    """timm's MambaOut splits its first projection in three, ``torch.split(x, self.split_indices, dim=-1)``: the
    gate, then the channels that pass and those a depthwise convolution mixes, which the gate multiplies
    together; ``(gate, passed, convolved)`` follows the output projection's and the convolution's widths."""
    fc2, conv = getattr(module, "fc2", None), getattr(module, "conv", None)
    if not isinstance(fc2, nn.Linear) or not isinstance(conv, nn.Conv2d):
        return None
    return fc2.in_features, fc2.in_features - conv.in_channels, conv.in_channels


def _inception_splits(block: nn.Module) -> tuple[int, int, int, int] | None:
    """timm's InceptionNeXt block splits its input four ways, ``torch.split(x, self.split_indexes, dim=1)`` in its
    token mixer: channels that pass, then one chunk for each of three depthwise convolutions (square, wide,
    tall). The chunks follow the convolutions; the channels that pass are what is left of the block's width (its
    MLP's input)."""
    mixer, fc1 = getattr(block, "token_mixer", None), getattr(getattr(block, "mlp", None), "fc1", None)
    convs = [getattr(mixer, name, None) for name in ("dwconv_hw", "dwconv_w", "dwconv_h")]
    if not isinstance(fc1, nn.Conv2d) or not all(isinstance(conv, nn.Conv2d) for conv in convs):
        return None
    widths = [conv.in_channels for conv in convs]
    return fc1.in_channels - sum(widths), *widths


def _partial_conv_untouched(block: nn.Module) -> int | None:
    """timm's FasterNet block convolves the first ``dim_conv3`` channels of its input and passes the other
    ``dim_untouched``, ``torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)``: those are what is left of
    the block's width (its MLP's output, added to its input) after the convolution's inputs. The convolution is
    dense: its outputs, concatenated back before the MLP, are a group of their own."""
    conv = getattr(getattr(block, "spatial_mixing", None), "partial_conv3", None)
    mlp = getattr(block, "mlp", None)
    last = mlp[-1] if isinstance(mlp, nn.Sequential) and len(mlp) else None
    if not isinstance(conv, nn.Conv2d) or not isinstance(last, nn.Conv2d):
        return None
    return last.out_channels - conv.in_channels


def _focal_splits(module: nn.Module) -> list[int] | None:
    """timm's FocalNet splits its first projection in three, ``torch.split(x, self.input_split, 1)``: the query, which
    multiplies the modulator ``h``'s output, the context, which ``h`` reads after the focal convolutions, and one
    gate per focal level (plus the global one), which stay."""
    f, h = getattr(module, "f", None), getattr(module, "h", None)
    if not isinstance(f, nn.Conv2d) or not isinstance(h, nn.Conv2d):
        return None
    return [h.out_channels, h.in_channels, f.out_channels - h.out_channels - h.in_channels]


def _scale_shape(module: nn.Module) -> tuple[int, ...] | None:
    """timm's MetaFormer ``Scale`` (PoolFormer, ConvFormer, CAFormer) multiplies by ``self.scale.view(self.shape)``,
    ``shape`` being ``(dim, 1, 1)`` or ``(dim,)``: its first entry follows the scale's length."""
    scale, shape = getattr(module, "scale", None), getattr(module, "shape", None)
    if not isinstance(scale, torch.Tensor) or not isinstance(shape, tuple) or not shape:
        return None
    return (scale.shape[0], *shape[1:])


def _linear_attention_dim(module: nn.Module) -> int | None:
    """EfficientViT (MIT)'s ``dim``: the width of each head's queries (keys, values) that its projection computes,
    its channels over the heads that its aggregation's grouped convolution counts (none without one)."""
    if not len(module.aggreg):
        return None
    qkv, grouped = module.qkv, module.aggreg[0][1]
    return getattr(qkv, "conv", qkv).out_channels // grouped.groups


Width = int | tuple[int, ...]
# qualified class name -> {attribute (of the module, or "submodule.attribute"): the "submodule.attribute" paths it may
# follow, the first that exists wins, or a function of the module}
STORED_WIDTHS: dict[str, dict[str, tuple[str, ...] | Callable[[nn.Module], Width | None]]] = {
    "torchvision.models.vision_transformer.VisionTransformer": {
        # a patchify convolution, or the last layer of a convolutional stem (conv_stem_configs)
        "hidden_dim": ("conv_proj.out_channels", "conv_proj.conv_last.out_channels"),
    },
    # Res2Net splits its first convolution's output with torch.split(out, self.width, 1), one chunk a branch
    "timm.models.res2net.Bottle2neck": {"width": ("convs.0.in_channels",)},
    # CSPNet's stages split their expansion in halves of the width they store: x.split(self.expand_chs // 2, dim=1)
    "timm.models.cspnet.CrossStage": {"expand_chs": ("conv_exp.conv.out_channels",)},
    "timm.models.cspnet.CrossStage3": {"expand_chs": ("conv_exp.conv.out_channels",)},
    # ReXNet adds its shortcut to the first channels of a wider output: x[:, 0:self.in_channels] + shortcut
    "timm.models.rexnet.LinearBottleneck": {
        "in_channels": ("conv_exp.conv.in_channels", "conv_dw.conv.in_channels"),
        "out_channels": ("conv_pwl.conv.out_channels",),
    },
    "timm.layers.selective_kernel.SelectiveKernel": {"in_channels": _paths_inputs},
    "timm.models.mambaout.GatedConvBlock": {"split_indices": _gated_conv_splits},
    # DPN keeps its residual path in the first num_1x1_c channels, x[:, :self.num_1x1_c], and the dense path in the
    # rest; its "b" variants compute the residual part with a layer of its own (without it, no layer has that width)
    "timm.models.dpn.DualPathBlock": {"num_1x1_c": ("c1x1_c1.out_channels",)},
    "timm.models.metaformer.Scale": {"shape": _scale_shape},
    "timm.models.focalnet.FocalModulation": {"input_split": _focal_splits},
    # EfficientViM's state-space mixer splits its hz_proj in halves of the width it stores, [self.d_inner] * 2, and
    # (its stand-in) its state projection in thirds, each self.state_dim wide
    "timm.models.efficientvim.HSMSSD": {"d_inner": ("out_proj.conv.in_channels",)},
    "regrow.structural.timm_attention.EfficientVimMixer": {
        "d_inner": ("out_proj.conv.in_channels",),
        "state_dim": lambda module: module.dw.conv.out_channels // 3,
    },
    # EfficientViT (MIT)'s linear attention (its stand-in) splits each scale into heads by their count; its dim is
    # the first scale's head width
    "regrow.structural.map_attention.MultiScaleLinearAttention": {"dim": _linear_attention_dim},
    "timm.models.inception_next.MetaNeXtBlock": {"token_mixer.split_indexes": _inception_splits},
    "timm.models.fasternet.MLPBlock": {
        "spatial_mixing.dim_conv3": ("spatial_mixing.partial_conv3.in_channels",),
        "spatial_mixing.dim_untouched": _partial_conv_untouched,
    },
}


def _rules(module: nn.Module) -> dict[str, tuple[str, ...] | Callable[[nn.Module], Width | None]]:
    for cls in type(module).__mro__:
        rules = STORED_WIDTHS.get(f"{cls.__module__}.{cls.__qualname__}")
        if rules:
            return rules
    return {}


def _read(module: nn.Module, path: str) -> int | None:
    owner, _, field = path.rpartition(".")
    try:
        value = getattr(module.get_submodule(owner), field)
    except AttributeError:  # a variant (or subclass) without this layer
        return None
    return value if isinstance(value, int) else None


def follow(model: nn.Module) -> None:
    """Set every stored width of ``model`` to the width of the layer it follows (after surgery); a rule whose
    layer the model does not have leaves its attribute alone."""
    for module in model.modules():
        for attribute, sources in _rules(module).items():
            if callable(sources):
                width = sources(module)
            else:
                width = next((w for w in (_read(module, p) for p in sources) if w is not None), None)
            if width is not None:
                owner, _, field = attribute.rpartition(".")
                setattr(module.get_submodule(owner), field, width)
