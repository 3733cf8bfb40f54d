"""regrow's stand-ins for timm's attention modules that merge their heads with their input's width (EVA, BEiT,
Swin V2, relative-position ViT): equal to timm's own to the bit, compared before they are swapped in, saved and
loaded with the model. That they let the residual stream shrink is tested with the other families, in test_zoo."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import regrow
from benchmarks.zoo import live_norms
from conftest import import_timm
from regrow.structural import timm_attention
from regrow.structural.heads import head_group
from regrow.structural.prepared import inner_projections
from regrow.structural.standins import convert_standins

timm = import_timm()

# family: (timm model, constructor arguments, input size, the attention modules that get a stand-in)
MODELS = {
    "eva_dinov3": ("vit_small_patch16_dinov3", {"img_size": 32, "depth": 2}, 32, "blocks.{}.attn", 2),
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28, "blocks.{}.attn", 2),
    # separate q / k / v projections, as timm's EVA-02 base and large (and their CLIP towers) have them
    "eva02_separate": (
        "eva02_tiny_patch14_224",
        {"img_size": 28, "depth": 2, "qkv_fused": False},
        28,
        "blocks.{}.attn",
        2,
    ),
    "beit": (
        "beit_base_patch16_224",
        {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4},
        32,
        "blocks.{}.attn",
        2,
    ),
    "swinv2": (
        "swinv2_tiny_window8_256",
        {"img_size": 32, "window_size": 4, "depths": (2, 2), "embed_dim": 32, "num_heads": (2, 4)},
        32,
        "layers.{}.blocks.{}.attn",
        (2, 2),
    ),
    "vit_relpos": ("vit_srelpos_small_patch16_224", {"img_size": 32, "depth": 2}, 32, "blocks.{}.attn", 2),
    # a strided convolution reduces the keys' map in the first stages, none in the last; or a pooling, in all
    "pvt_v2": ("pvt_v2_b0", {"depths": (1, 1, 1, 1)}, 64, "stages.{}.blocks.{}.attn", (1, 1, 1, 1)),
    "pvt_v2_linear": ("pvt_v2_b0", {"depths": (1, 1, 1, 1), "linear": True}, 64, "stages.{}.blocks.{}.attn", (1,) * 4),
    "davit": (  # channel attention and window attention in turn
        "davit_tiny",
        {"depths": (1, 1, 1, 1)},
        64,
        "stages.{}.blocks.0.{}.attn",
        (2, 2, 2, 2),
    ),
    "davit_v2": (
        "davit_tiny",
        {"depths": (1,) * 4, "channel_attn_v2": True},
        64,
        "stages.{}.blocks.0.{}.attn",
        (2,) * 4,
    ),
    # windows of 7 tokens (padded: 16, 8, 4 and 2 tokens a side) and keys from a map reduced by a convolution
    "twins": ("twins_svt_small", {"depths": (2, 2, 2, 2)}, 64, "blocks.{}.{}.attn", (2, 2, 2, 2)),
    "xcit": (  # cross-covariance attention, then CaiT's class attention
        "xcit_nano_12_p8_224",
        {"img_size": 32, "depth": 2},
        32,
        "{}.attn",
        ["blocks.0", "blocks.1", "cls_attn_blocks.0", "cls_attn_blocks.1"],
    ),
    "edgenext": (
        "edgenext_xx_small",
        {},
        64,
        "stages.{}.xca",
        ["1.blocks.1", "2.blocks.5", "3.blocks.1"],
    ),
    "swinv2_cr": (
        "swinv2_cr_tiny_224",
        {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)},
        64,
        "stages.{}.blocks.{}.attn",
        (1, 1, 1, 1),
    ),
    "nest": ("nest_tiny", {"img_size": 32}, 32, "levels.{}.transformer_encoder.{}.attn", (2, 2, 8)),
    "crossvit": (  # each branch's class token attends to the other branch's tokens
        "crossvit_tiny_240",
        {"img_size": 48, "img_scale": (1.0, 1.0), "depth": [[1, 1, 0]] * 2},
        48,
        "blocks.{}.fusion.{}.attn",
        (2, 2),
    ),
    "nextvit": (  # keys and values from a map reduced by average pooling, then a BatchNorm1d; none in the last stage
        "nextvit_small",
        {"depths": (1, 1, 5, 1)},
        64,
        "{}.e_mhsa",
        ["stages.1.blocks.0", "stages.2.blocks.4", "stages.3.blocks.0"],
    ),
    # gated positional attention in the blocks before the class token joins, plain attention after it
    "convit": ("convit_tiny", {"img_size": 32, "depth": 3, "local_up_to_layer": 2}, 32, "blocks.{}.attn", 3),
    # factorized attention with a relative position encoding by convolutions of the values, shared by the blocks
    "coat": (
        "coat_lite_tiny",
        {"serial_depths": (1, 1, 1, 1), "img_size": 64},
        64,
        "serial_blocks{}.0.factoratt_crpe",
        [1, 2, 3, 4],
    ),
    # a state-space mixer in the dual form, its state projection split in three by a width it stores
    "efficientvim": ("efficientvim_m1", {"depths": (2, 1, 1)}, 64, "stages.{}.blocks.{}.mixer", (2, 1, 1)),
    "volo": (  # outlook attention over unfolded windows, then attention over a (B, H, W, C) map
        "volo_d1_224",
        {"img_size": 64},
        64,
        "network.{}.attn",
        [f"{stage}.{i}" for stage, n in ((0, 4), (2, 4), (3, 8), (4, 2)) for i in range(n)],
    ),
    "cait": (  # talking heads in the blocks, then the class token's attention
        "cait_xxs24_224",
        {"img_size": 32, "depth": 2, "depth_token_only": 1},
        32,
        "{}.attn",
        ["blocks.0", "blocks.1", "blocks_token_only.0"],
    ),
}


def build(family: str, **extra) -> tuple[nn.Module, torch.Tensor, list[str]]:
    name, kwargs, size, pattern, counts = MODELS[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs, **extra).eval()
    for module in model.modules():  # random weights: make the zero-initialised loose biases count
        for key in ("q_bias", "v_bias"):
            if isinstance(getattr(module, key, None), nn.Parameter):
                nn.init.normal_(getattr(module, key), std=0.1)
    heads = model.get_classifier()  # timm's tiny classifier init gives outputs near 1e-4; CrossViT has two
    for head in heads if isinstance(heads, nn.ModuleList) else [heads]:
        nn.init.normal_(head.weight)
    if isinstance(counts, int):
        names = [pattern.format(i) for i in range(counts)]
    elif isinstance(counts, list):
        names = [pattern.format(parent) for parent in counts]
    else:
        names = [pattern.format(stage, i) for stage, n in enumerate(counts) for i in range(n)]
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)), names


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_the_stand_ins_compute_timms_outputs_and_gradients_to_the_bit(family, fused):
    model, x, names = build(family)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    ours = copy.deepcopy(model)
    assert convert_standins(ours, x) == names
    assert all(type(ours.get_submodule(n)).__module__ == timm_attention.__name__ for n in names)
    assert ours.state_dict().keys() == model.state_dict().keys()
    outputs, grads = [], []
    for net in (model, ours):
        outputs.append(net(x))
        outputs[-1].square().sum().backward()
        grads.append({k: p.grad for k, p in net.named_parameters()})
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0] if grads[0][k] is not None)


def test_a_stand_in_that_computes_something_else_is_not_swapped_in(monkeypatch):
    # What a newer timm whose module the stand-in does not follow would look like: the output differs.
    model, x, names = build("beit")
    forward = timm_attention.BeitAttention.forward
    monkeypatch.setattr(timm_attention.BeitAttention, "forward", lambda self, x, **kw: 1.01 * forward(self, x, **kw))
    with pytest.warns(UserWarning, match=r"blocks\.\d\.attn: kept timm\.models\.beit\.Attention as it is, .*largest"):
        assert convert_standins(model, x) == []
    assert type(model.blocks[0].attn).__module__ == "timm.models.beit"
    with pytest.warns(UserWarning, match=r"kept timm\.models\.beit\.Attention as it is"):
        report = regrow.prune(model, pattern="channel", macs=0.7, example_inputs=x, keep_dense=False).structure
    assert report.standins == [] and report.equivalence.passed
    stream = next(g for g in report.groups if g["name"] == "patch_embed.proj")
    assert "shrinking it breaks the forward pass" in stream["excluded"]


def test_a_stand_in_that_fails_on_the_module_is_not_swapped_in(monkeypatch):
    model, x, names = build("eva02")

    def missing(self, name):
        raise AttributeError(f"module 'timm.models.eva' has no attribute {name!r}")

    monkeypatch.setattr(timm_attention._Adopted, "_helper", missing)
    with pytest.warns(UserWarning, match=r"AttributeError: module 'timm.models.eva' has no attribute"):
        assert convert_standins(model, x) == []
    assert convert_standins(model) == names  # without an example batch (as on load), nothing is compared


def test_the_comparison_runs_in_eval_mode_and_leaves_the_modes_as_they_were():
    # dropout in training mode would make the stand-in and timm's module differ draw by draw
    model, x, names = build("beit", attn_drop_rate=0.5, proj_drop_rate=0.5)
    model.train()
    assert convert_standins(model, x) == names
    assert all(m.training for m in model.modules())


def test_nothing_is_swapped_where_the_example_batch_does_not_run():
    model, x, names = build("beit")
    assert convert_standins(model, torch.randn(2, 3, 40, 40)) == []  # a size the model was not built for
    assert type(model.blocks[0].attn).__module__ == "timm.models.beit"


def test_a_module_the_example_batch_does_not_reach_is_left_as_it_is():
    model, x, names = build("vit_relpos")
    model.blocks = model.blocks[:1]
    model.spare = copy.deepcopy(model.blocks[0])
    with pytest.warns(UserWarning, match=r"spare\.attn: .* the example batch does not reach it"):
        assert convert_standins(model, x) == ["blocks.0.attn"]


@pytest.mark.parametrize(
    ("family", "pattern"),
    [("eva02", "channel"), ("swinv2", "channel"), ("beit", "head"), ("convit", "channel"), ("coat", "channel")],
)
def test_a_pruned_model_saves_and_loads_with_timms_stand_ins(tmp_path, family, pattern):
    # with heads gone, BEiT's zero key bias (a buffer the state dict leaves out) came back as uninitialised memory;
    # ConViT's relative positions (another, computed in the first call) came back as zeros the model took as them
    model, x, names = build(family)
    dense = copy.deepcopy(model)
    budget = {"macs": 0.5} if pattern == "channel" else {"sparsity": 0.5}
    report = regrow.prune(model, pattern=pattern, example_inputs=x, keep_dense=False, **budget).structure
    assert report.equivalence.passed and report.standins == names
    # the residual streams the stand-ins write to shrank, or their heads (which ones depends on the weights)
    shrunk = [
        n for n in names if model.get_submodule(n).proj.weight.numel() < dense.get_submodule(n).proj.weight.numel()
    ]
    assert shrunk
    regrow.save(model, tmp_path / family)
    name, kwargs, *_ = MODELS[family]
    loaded = regrow.load(tmp_path / family, lambda: timm.create_model(name, num_classes=10, **kwargs)).eval()
    assert type(loaded.get_submodule(names[0])) is type(model.get_submodule(names[0]))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for name in names:
        bias = getattr(loaded.get_submodule(name), "k_bias", None)
        assert bias is None or torch.equal(bias, torch.zeros_like(bias))


def test_the_stand_ins_answer_for_the_methods_of_timms_modules():
    # Was: "'SwinV2WindowAttention' object has no attribute 'set_window_size'" from model.set_input_size
    for family in ("swinv2", "beit"):
        model, x, names = build(family)
        assert convert_standins(model, x) == names
        model.set_input_size(img_size=(64, 64))
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(AttributeError, match="no_such_method"):
        model.get_submodule(names[0]).no_such_method()


@pytest.mark.parametrize("family", ["beit", "swinv2"])
def test_heads_go_with_their_rows_of_the_loose_q_k_v_biases(family):
    # BEiT and Swin V2 hold q and v biases (and a zero k bias buffer) beside a qkv Linear without one; removing a
    # head left them whole ("The expanded size of the tensor (48) must match the existing size (192)"), and the
    # simulation, which zeroes the head's value rows, left its value bias (set non-zero here) in place.
    model, x, names = build(family)
    attn = model.get_submodule(names[-1])
    heads, width = attn.num_heads, attn.q_bias.numel()
    report = regrow.prune(model, pattern="head", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed, report.equivalence
    group = next(g for g in report.groups if g["name"] == names[-1])
    assert group["excluded"] is None
    attn = model.get_submodule(names[-1])  # the stand-in now
    assert attn.num_heads == heads // 2 and attn.qkv.out_features == 3 * width // 2
    assert attn.q_bias.shape == attn.v_bias.shape == attn.k_bias.shape == (width // 2,)
    assert isinstance(attn.q_bias, nn.Parameter) and "k_bias" in attn._non_persistent_buffers_set
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("family", ["pvt_v2", "pvt_v2_linear"])
def test_the_single_head_attention_of_pvt_v2s_first_stage_loses_inner_channels(family):
    # One head's width is free, but it was left out as one that "shrinks only by whole heads (pattern 'head')",
    # which refuses a single head. Its channels then broke the forward pass: the stand-in split the keys and values
    # by the stored head_dim; it now splits them by the queries' width, as Twins' does.
    model, x, names = build(family)
    single = [n for n in names if model.get_submodule(n).num_heads == 1]
    assert single and all(hasattr(model.get_submodule(n), "kv") for n in single)
    width = {n: model.get_submodule(n).q.out_features for n in single}
    report = regrow.prune(model, pattern="channel", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed, report.equivalence
    assert not [g for g in report.groups if g["name"].startswith(tuple(single)) and g["excluded"]], report.groups
    for n in single:
        attn = model.get_submodule(n)
        assert attn.q.out_features == attn.proj.in_features < width[n]
        assert attn.kv.out_features == 2 * attn.q.out_features


def test_next_vits_heads_go_whole():
    # Next-ViT's attention merged its heads by its input's width: removing a head broke the forward pass ("shape
    # '[2, 64, 192]' is invalid for input of size 12288"), and pattern 'head' had nothing to remove.
    model, x, names = build("nextvit")
    model = live_norms(model, x.shape[-1])  # its batch norms at 0 / 1 left outputs of 3.6e-4: too small to tell
    widths = {n: (model.get_submodule(n).num_heads, model.get_submodule(n).proj.out_features) for n in names}
    report = regrow.prune(model, pattern="head", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    assert not [g for g in report.groups if g["excluded"]], report.groups
    for n in names:
        attn = model.get_submodule(n)
        inner = attn.num_heads * attn.head_dim
        assert attn.num_heads < widths[n][0] and attn.proj.out_features == widths[n][1]
        assert attn.q.out_features == attn.k.out_features == attn.v.out_features == attn.proj.in_features == inner
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_next_vits_stage_ends_prune_by_channel():
    # The concatenated stream at the end of each Next-ViT stage is read by convolutions of several channel groups
    # over its two parts (6 groups of the first 192 channels and 2 of the last 64, in the full model): it was left
    # out ("512 channels do not split into 12 channel groups") until each convolution's groups were balanced alone.
    model, x, _ = build("nextvit")
    for module in model.modules():  # weights that keep the activations' scale, for a check that can tell
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
    report = regrow.prune(model, pattern="channel", macs=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.scale > 0.1, report.equivalence
    assert abs(report.macs_ratio - 0.5) <= 0.01
    ends = {g["name"]: g for g in report.groups if g["name"].endswith("blocks.0.patch_embed.conv")}
    assert len(ends) == 4 and all(g["excluded"] is None for g in ends.values()), ends
    assert (
        ends["stages.2.blocks.0.patch_embed.conv"]["units_after"]
        < ends["stages.2.blocks.0.patch_embed.conv"]["units_before"]
    )


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul"])
def test_a_single_head_that_loses_channels_keeps_its_temperature(fused):
    # timm leaves its fused attention's scale to the default, one over the root of q's width: a head that lost half
    # its channels attended at a temperature sqrt(2) higher than its simulation (those channels zeroed). On
    # pvt_v2_b0's random weights the check passed anyway (3.8e-4 against a tolerance of 1.3e-3).
    model, x, names = build("pvt_v2")
    convert_standins(model, x)
    attn = model.get_submodule(names[0]).train(False)  # the first stage: one head
    attn.fused_attn, width = fused, attn.q.out_features
    assert attn.num_heads == 1 and isinstance(attn, timm_attention.PvtAttention)
    keep, drop = torch.arange(0, width, 2), torch.arange(1, width, 2)
    zeroed, shrunk = copy.deepcopy(attn), copy.deepcopy(attn)
    with torch.no_grad():
        for layer, rows in ((zeroed.q, drop), (zeroed.kv, drop), (zeroed.kv, drop + width)):
            layer.weight[rows], layer.bias[rows] = 0, 0
        for name, rows in (("q", keep), ("kv", torch.cat([keep, keep + width]))):
            layer = getattr(shrunk, name)
            new = nn.Linear(layer.in_features, len(rows))
            new.weight.copy_(layer.weight[rows]), new.bias.copy_(layer.bias[rows])
            setattr(shrunk, name, new)
        proj = nn.Linear(len(keep), shrunk.proj.out_features)
        proj.weight.copy_(shrunk.proj.weight[:, keep]), proj.bias.copy_(shrunk.proj.bias)
        shrunk.proj = proj
        tokens = 4 * torch.randn(2, 16 * 16, width, generator=torch.Generator().manual_seed(2))  # peaked attention
        expected, got = zeroed(tokens, [16, 16]), shrunk(tokens, [16, 16])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_a_single_head_next_vit_attention_loses_inner_channels(sr_ratio):
    # Its stand-in split heads by the stored head_dim: a single head's width then failed its probe ("shape
    # '[2, 16, 1, 32]' is invalid"). It splits them by the widths its layers give, as the other stand-ins.
    attention = importlib.import_module("timm.models.nextvit").EfficientAttention

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.head = (
                nn.Linear(3, 32),
                attention(32, head_dim=32, sr_ratio=sr_ratio),
                nn.Linear(32, 10),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head((h + self.attn(h)).mean(1))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(1))
    nn.init.normal_(model.attn.proj.weight)
    report = regrow.prune(model, pattern="channel", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and not [
        g for g in report.groups if g["name"].startswith("attn.") and g["excluded"]
    ]
    attn = model.attn
    assert isinstance(attn, timm_attention.NextVitAttention) and attn.num_heads == 1
    assert attn.q.out_features == attn.k.out_features < 32 and attn.v.out_features == attn.proj.in_features < 32


@pytest.mark.parametrize("family", ["pvt_v2", "pvt_v2_linear", "twins"])
def test_heads_of_an_attention_with_a_fused_key_value_projection_go_whole(family):
    # PVT v2 projects its queries with q and its keys and values with one kv Linear: no head was found ("no
    # q/k/v or fused qkv Linear projections found"), and channel pruning probed q's outputs as a group of its own.
    # Where it reduces the keys' and values' map first (sr, then norm: PVT v2's and Twins' first stages), the norm
    # was taken for one over all heads' outputs, and those heads were refused ("its norm 'norm' normalises ...").
    model, x, names = build(family)
    fused_kv = [n for n in names if model.get_submodule(n).num_heads > 1 and hasattr(model.get_submodule(n), "kv")]
    reduced = [n for n in fused_kv if getattr(model.get_submodule(n), "sr", None) is not None]
    assert reduced and "norm" in dict(model.get_submodule(reduced[0]).named_children())
    head_dim = {n: model.get_submodule(n).q.out_features // model.get_submodule(n).num_heads for n in fused_kv}
    heads = sum(model.get_submodule(n).num_heads for n in reduced)
    report = regrow.prune(model, pattern="head", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed, report.equivalence
    assert all(g["excluded"] is None for g in report.groups if g["name"] in fused_kv), report.groups
    assert sum(model.get_submodule(n).num_heads for n in reduced) < heads
    for n in fused_kv:  # each lost whole heads: its queries, keys and values, and the output's columns
        attn = model.get_submodule(n)
        inner = attn.num_heads * head_dim[n]
        assert attn.q.out_features == attn.proj.in_features == inner and attn.kv.out_features == 2 * inner


def test_volos_stream_and_heads_go():
    """VOLO's attention split its heads by the stream's width and merged them back to it, and its outlook attention
    split and folded its values by it too: every group through the stream failed its probe (6 of volo_d1_224 left
    out), and pattern 'head' found no head it could remove. The outlook attention's weights (heads x window x
    window a position, computed by its ``attn`` Linear) are no channels: they are left out as its inner width
    before any probe (they failed theirs, "shape '[2, 196, 6, 9, 9]' is invalid")."""
    model, x, names = build("volo")
    model = live_norms(model, 64)
    pruned = copy.deepcopy(model)
    report = regrow.prune(pruned, pattern="channel", macs=0.5, example_inputs=x, keep_dense=False).structure
    assert report.standins == names and report.equivalence.passed and report.equivalence.judges, report.equivalence
    benign = ("inside attention", "not a target", "its channels are the model's output")  # the classifiers'
    left_out = {g["name"]: why for g in report.groups if (why := g["excluded"]) and not why.startswith(benign)}
    assert not left_out, left_out
    weights = {g["name"]: g["excluded"] for g in report.groups if g["name"].endswith(".attn.attn")}
    assert len(weights) == 4 and all(
        why.startswith(f"inside attention {n.removesuffix('.attn')!r}: its inner width is split into heads")
        for n, why in weights.items()
    ), weights
    streams = [
        g
        for g in report.groups
        if {"network.0.0.attn.v (Linear, in)", "network.2.0.attn.qkv (Linear, in)"} & {*g["members"]}
    ]
    assert len(streams) == 2 and all(g["excluded"] is None for g in streams)  # both stages' streams may shrink
    heads = copy.deepcopy(model)
    report = regrow.prune(heads, pattern="head", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    after = [heads.network[s][i].attn.num_heads for s, n in ((2, 4), (3, 8), (4, 2)) for i in range(n)]
    assert sum(after) < 14 * 12


def test_mvitv2s_heads_go_where_it_adds_their_pooled_queries_to_their_outputs(tmp_path):
    """MViTv2 adds each head's pooled queries to its output and normalises its pooled values: a head whose values
    were zeroed still had an output, so every head failed its probe (pattern 'head' found none it could remove)."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("mvitv2_tiny", img_size=64, num_classes=10).eval()

    model = live_norms(make(), 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    attns = {n: m for n, m in model.named_modules() if type(m).__name__ == "MultiScaleAttention" and m.num_heads > 1}
    before = {n: m.num_heads for n, m in attns.items()}
    assert len(attns) == 9 and all(m.residual_pooling and m.norm_v is not None for m in attns.values())
    report = regrow.prune(model, pattern="head", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    assert all(g["excluded"] is None for g in report.groups if g["name"] in attns), report.groups
    assert sum(m.num_heads for m in attns.values()) < sum(before.values())
    for m in attns.values():
        assert m.dim_out == m.num_heads * m.head_dim == m.proj.in_features == m.qkv.out_features // 3
    with torch.no_grad():
        y = model(x)
    regrow.save(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(regrow.load(tmp_path, make)(x), y)


def test_mvitv2s_pooling_of_each_heads_queries_keys_and_values_is_left_out_as_its_inner_width():
    """MViTv2 folds its heads into the batch and pools them with one depthwise filter a channel of every head; the
    trace cannot tie those channels to the projection, so each pooling's group (9 of mvitv2_tiny) went to a probe,
    which failed ("shrinking it breaks the forward pass") and was reported as one."""
    torch.manual_seed(0)
    model = timm.create_model("mvitv2_tiny", img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    report = regrow.prune(model, pattern="channel", macs=0.5, example_inputs=x, keep_dense=False).structure
    pooling = {g["name"]: g["excluded"] for g in report.groups if g["name"].endswith(".attn.pool_q")}
    assert sorted(pooling) == [
        f"stages.{s}.blocks.{b}.attn.pool_q" for s, n in ((1, 2), (2, 5), (3, 2)) for b in range(n)
    ]
    for name, why in pooling.items():
        owner = name.removesuffix(".pool_q")
        assert why == f"inside attention {owner!r}: its inner width shrinks only by whole heads (pattern 'head')"
    assert all(m.pool_q.out_channels == m.head_dim == 96 for m in model.modules() if hasattr(m, "pool_q"))
    assert report.equivalence.passed and abs(report.macs_ratio - 0.5) <= 0.01


@pytest.mark.parametrize("name", ["lowformer_b0", "cpubone_nano"])
def test_a_fused_convolution_split_into_heads_by_stored_widths_is_left_out_as_the_attentions_inner_width(name):
    """LowFormer's and CPUBone's attention reshape their fused q / k / v convolution (``pwise``) into heads by the
    head width they store, also with one head: each of its groups failed its probe ("shape '[2, 2, 96, 4]' is
    invalid"), reported as broken (7 of lowformer_b0, 3 of cpubone_nano)."""
    torch.manual_seed(0)
    model = live_norms(timm.create_model(name, num_classes=10).eval(), 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    report = regrow.prune(model, pattern="channel", macs=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges and abs(report.macs_ratio - 0.5) <= 0.01
    fused = {g["name"]: g["excluded"] for g in report.groups if g["name"].endswith(".pwise")}
    assert fused and all(
        why.startswith(f"inside attention {n.removesuffix('.pwise')!r}: its inner width is split into heads")
        for n, why in fused.items()
    ), fused
    benign = ("inside attention", "not a target", "its channels are the model's output")
    assert not [g["name"] for g in report.groups if (why := g["excluded"]) and not why.startswith(benign)]


def test_efficientformer_v2s_attention_projections_are_its_inner_width():
    """EfficientFormerV2 splits its q / k / v convolutions (inside ``ConvNorm`` modules, so not named as such
    layers) into heads by widths it stores: their groups failed their probes or ran away (11 of
    efficientformerv2_s0, reported as broken); they are its inner width, left out before any probe."""
    eff = timm.models.efficientformer_v2
    attention = eff.Attention2d(32, key_dim=8, num_heads=2, attn_ratio=2, resolution=4)
    downsample = eff.Attention2dDownsample(32, key_dim=8, num_heads=2, attn_ratio=2, resolution=4)
    for module, q in ((attention, "q.conv"), (downsample, "q.proj.conv")):
        group = head_group("mixer", module)
        assert group.excluded == "no q/k/v or fused qkv Linear projections found"
        assert inner_projections(group, module) == {f"mixer.{q}", "mixer.k.conv", "mixer.v.conv"}


def test_a_subclass_of_an_attention_split_into_heads_by_stored_widths_is_read_as_its_parent():
    class Mine(timm.models.lowformer.ConvAttention):
        pass

    module = Mine(64)
    assert inner_projections(head_group("attn", module), module) == {"attn.pwise"}
