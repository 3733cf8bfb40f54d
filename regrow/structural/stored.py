"""Widths that an architecture keeps as plain attributes and reads in its forward pass.

A layer handler updates the layer it shrinks (``out_channels``, ``normalized_shape``, ...), but some models
also store a width of their own and reshape with it: torchvision's ``VisionTransformer`` flattens its patch
embedding with ``x.reshape(n, self.hidden_dim, n_h * n_w)``. Left stale, the attribute breaks the forward pass
of the shrunk model, so every probe of the residual stream failed and the stream was never pruned. Each entry
names the attribute and the layer width it must equal after surgery; :func:`follow` sets them. Classes are
matched by their qualified name (subclasses too), so the architectures' packages are never imported here.
"""

from __future__ import annotations

from torch import nn

# qualified class name -> {attribute: "submodule.attribute" whose value it must equal}
STORED_WIDTHS: dict[str, dict[str, str]] = {
    "torchvision.models.vision_transformer.VisionTransformer": {"hidden_dim": "conv_proj.out_channels"},
}


def _rules(module: nn.Module) -> dict[str, str]:
    for cls in type(module).__mro__:
        rules = STORED_WIDTHS.get(f"{cls.__module__}.{cls.__qualname__}")
        if rules:
            return rules
    return {}


def follow(model: nn.Module) -> None:
    """Set every stored width of ``model`` to the width of the layer it follows (after surgery)."""
    for module in model.modules():
        for attribute, source in _rules(module).items():
            owner, _, field = source.rpartition(".")
            setattr(module, attribute, getattr(module.get_submodule(owner), field))
