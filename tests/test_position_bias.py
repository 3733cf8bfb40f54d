"""Relative position biases an attention holds as a child (regrow.structural.position_bias): timm's RelPosBias
and RelPosMlp lose heads with their attention, by hand and in timm's relative-position ViT, MaxViT and GCViT."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import regrow
from benchmarks.zoo import _random_classifier, live_norms
from conftest import import_timm
from regrow.structural.graph import find_attention
from regrow.structural.position_bias import is_position_bias, keep_per_head

timm = import_timm()


@pytest.mark.parametrize("kind", ["RelPosBias", "RelPosMlp"])
def test_a_position_bias_loses_the_heads_its_attention_loses(kind):
    torch.manual_seed(0)
    holder = nn.Module()  # an attention, as far as its per-head tensors go
    holder.rel_pos = bias = getattr(timm.layers, kind)(window_size=(2, 2), num_heads=3).eval()  # no MLP dropout
    for p in bias.parameters():
        nn.init.normal_(p)
    before = bias.get_bias()
    assert before.shape == (1, 3, 4, 4)
    keep_per_head(holder, 3, [1])
    assert bias.bias_shape == (4, 4, 2) and getattr(bias, "num_heads", 2) == 2
    if kind == "RelPosMlp":
        assert bias.mlp.fc2.out_features == 2
    else:
        assert bias.relative_position_bias_table.shape[1] == 2
    torch.testing.assert_close(bias.get_bias(), before[:, [0, 2]], rtol=0, atol=1e-6)


def _model(name: str, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return live_norms(_random_classifier(model), 64), x


# model, its arguments, the attention modules whose heads cannot go (by name prefix or suffix), and why
HEADED = {
    # a position-bias MLP (RelPosMlp) declares the head count: it was taken for the attention, none was found
    "vit_relpos": ("vit_relpos_small_patch16_224", {"img_size": 64, "depth": 2}, (), ""),
    # each head's q, k and v rows together in the fused projection (head_first); a bias table viewed by its heads
    "maxvit": ("maxvit_rmlp_pico_rw_256", {"img_size": 64}, ("stages.0.",), "it has a single head"),
    # the global blocks' queries are the stream's (their keys and values split by it, not a third of the qkv)
    "gcvit": (
        "gcvit_xxtiny",
        {"img_size": 64, "window_size": (2, 2, 2, 2)},
        ("blocks.1.attn", "blocks.3.attn", "blocks.5.attn"),
        "not a third of its fused qkv",
    ),
}


@pytest.mark.parametrize("family", sorted(HEADED))
def test_relative_position_attention_loses_heads_and_saves_and_loads(family, tmp_path):
    name, kwargs, kept, why = HEADED[family]
    model, x = _model(name, **kwargs)
    attention = find_attention(model)
    assert attention and not any(is_position_bias(m) for m in attention.values())
    heads = {n: m.num_heads for n, m in attention.items()}
    report = regrow.prune(model, pattern="head", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    excluded = {g["name"]: g["excluded"] for g in report.groups if g["excluded"]}
    assert {n: why in e and (n.startswith(kept) or n.endswith(kept)) for n, e in excluded.items()} == dict.fromkeys(
        excluded, True
    ), excluded
    after = {n: model.get_submodule(n).num_heads for n in attention}
    assert sum(after.values()) < sum(heads.values())
    for n in attention:
        bias = getattr(model.get_submodule(n), "rel_pos", None)
        if bias is not None:
            assert bias.bias_shape[-1] == after[n], n
    with torch.no_grad():
        y = model(x)
    regrow.save(model, tmp_path)
    loaded = regrow.load(tmp_path, lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), y)


# model, its arguments and input size, and the attention class whose heads could not go: XCiT's and EdgeNeXt's
# temperature (one a head) was not sliced; DaViT's channel attention applies its attention to the queries, not the
# values (the simulation zeroed the values); Swin V2 CR's position MLP (``meta_mlp``) kept every head's output;
# NesT merges its heads channel-major, and the output projection lost the columns of head-major heads
HEAD_FAMILIES = {
    "nest": (
        timm.models.nest.Nest,  # nest_tiny's heads, half its widths (its constructor fixes them)
        {"img_size": 32, "embed_dims": (48, 96, 192), "num_heads": (3, 6, 12), "depths": (1, 1, 2)},
        32,
        "Attention",
    ),
    "xcit": ("xcit_nano_12_p8_224", {"img_size": 32, "depth": 2}, 32, "XCA"),
    "edgenext": ("edgenext_xx_small", {}, 64, "CrossCovarianceAttn"),
    "davit": ("davit_tiny", {"depths": (1, 1, 1, 1)}, 64, "ChannelAttention"),
    "swinv2_cr": ("swinv2_cr_tiny_224", {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)}, 64, "Window"),
}


@pytest.mark.parametrize("family", sorted(HEAD_FAMILIES))
def test_the_heads_of_these_timm_attention_classes_go(family, tmp_path):
    name, kwargs, size, kind = HEAD_FAMILIES[family]
    torch.manual_seed(0)
    make = functools.partial(name if callable(name) else functools.partial(timm.create_model, name), num_classes=10)
    model = live_norms(_random_classifier(make(**kwargs).eval()), size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    chosen = {n: m.num_heads for n, m in find_attention(model).items() if type(m).__name__.startswith(kind)}
    report = regrow.prune(model, pattern="head", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    excluded = {g["name"]: g["excluded"] for g in report.groups if g["name"] in chosen and g["excluded"]}
    assert chosen and not excluded, excluded
    assert sum(model.get_submodule(n).num_heads for n in chosen) < sum(chosen.values())
    regrow.save(model, tmp_path)
    loaded = regrow.load(tmp_path, lambda: make(**kwargs)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
