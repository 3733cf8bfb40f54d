"""What an attention holds one per head beside its projections, sliced when heads go (:func:`keep_per_head`).

Parameters one entry a head along a dim (``PER_HEAD``: relative position tables, Swin V2's logit scale, TinyViT's
and LeViT's attention biases, the temperature of cross-covariance attention), the last layer of a position-bias
MLP (``PER_HEAD_MLP``), and relative position biases held as a child module of their own.

timm's ``RelPosBias`` and ``RelPosMlp`` (in its relative-position ViTs, MaxViT and CoAtNet, GCViT, and the ViTs
that share one across blocks) make one bias a head, from a table or a small MLP, and view it by a head count they
store: ``bias_shape`` (and ``RelPosMlp``'s ``num_heads``). ``RelPosMlp`` declares ``num_heads``, so it was taken
for the attention itself, which then went unfound (pattern 'head' on a relative-position ViT: "no q/k/v or fused
qkv Linear projections found"); where the attention was found, removing heads sliced the table but left
``bias_shape`` as it was, and every probe failed (timm's MaxViT and GCViT: ``shape '[4, 4, 2]' is invalid``).
:func:`is_position_bias` keeps such a module out of the attention modules; :func:`keep_heads` removes heads from
it with its attention's. Classes are matched by their qualified name; timm is never imported here.
"""

from __future__ import annotations

from torch import nn

from regrow.structural.attention import keep_index
from regrow.structural.pruners import keep_rows

POSITION_BIASES = {"timm.layers.pos_embed_rel.RelPosBias", "timm.layers.pos_embed_rel.RelPosMlp"}
# Parameters with one entry per head along a dim (Swin's relative position bias table, Swin V2's logit scale, the
# temperature of XCiT's and EdgeNeXt's cross-covariance attention), and a child MLP whose last Linear outputs one
# value per head (Swin V2's position-bias MLP: torchvision's and timm's name, Hugging Face's, Swin V2 CR's).
PER_HEAD = {"relative_position_bias_table": -1, "logit_scale": 0, "attention_biases": 0, "temperature": 0}
PER_HEAD_MLP = ("cpb_mlp", "continuous_position_bias_mlp", "meta_mlp")


def is_position_bias(module: nn.Module) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in POSITION_BIASES for cls in type(module).__mro__)


def keep_heads(bias: nn.Module, heads: int, removed: list[int]) -> None:
    """Remove the heads ``removed`` of ``heads`` from a position bias (:func:`is_position_bias`): the rows of its
    MLP's last layer, one a head (its table is sliced as any per-head parameter), and the head count its views
    read."""
    keep_head_rows(getattr(bias, "mlp", None), heads, removed)
    left = heads - len(removed)
    if getattr(bias, "num_heads", None) == heads:
        bias.num_heads = left
    shape = getattr(bias, "bias_shape", None)
    if isinstance(shape, tuple) and shape and shape[-1] == heads:
        bias.bias_shape = (*shape[:-1], left)


def keep_head_rows(mlp: object, heads: int, removed: list[int]) -> None:
    """Remove the rows of the heads ``removed`` from the last Linear of ``mlp`` where it outputs one value a head
    (a position-bias MLP); anything else is left alone."""
    last = [m for m in mlp.modules() if isinstance(m, nn.Linear)][-1:] if isinstance(mlp, nn.Module) else []
    if last and last[0].out_features == heads:
        keep_rows(last[0], keep_index(heads, 1, removed, last[0].weight.device))


def keep_per_head(module: nn.Module, heads: int, removed: list[int]) -> None:
    """Slice the module's per-head tensors (``PER_HEAD``, ``PER_HEAD_MLP``) to the heads that stay: its own, or a
    child's (Hugging Face's Swin keeps its table in a ``relative_position_bias`` module)."""
    for owner in (module, *module.children()):
        for name, dim in PER_HEAD.items():
            param = owner._parameters.get(name)
            if param is not None and param.dim() > 0 and param.shape[dim] == heads:
                keep = keep_index(heads, 1, removed, param.device)
                kept = param.index_select(dim % param.dim(), keep).contiguous()
                setattr(owner, name, nn.Parameter(kept, requires_grad=param.requires_grad))
        if is_position_bias(owner):
            keep_heads(owner, heads, removed)
    for name in PER_HEAD_MLP:
        keep_head_rows(getattr(module, name, None), heads, removed)
