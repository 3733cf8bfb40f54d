"""EfficientViT (MSRA)'s cascaded group attention, iFormer's single-head modulation attention, SHViT's single-head
attention over part of the stream and EfficientViT (MIT)'s multi-scale linear attention: regrow's stand-ins
(regrow.structural.map_attention), the marks they put on their tensors (regrow.structural.marks) and the channel
groups they give."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import regrow
from conftest import first_calls, import_timm
from regrow.structural import map_attention
from regrow.structural.graph import StructureGraph
from regrow.structural.marks import NO_CHANNELS, SAME_CHANNELS, channel_free, reading, same_channels
from regrow.structural.standins import convert_standins

timm = import_timm()
CGA = timm.models.efficientvit_msra.CascadedGroupAttention
SHMA = timm.models.iformer.SHMA
SHSA = timm.models.shvit.SHSA
LITE_MLA = timm.models.efficientvit_mit.LiteMLA


class Cascade(nn.Module):
    """A stream of 32 channels through one cascaded attention of 4 heads (4 key, 8 value channels each: a slice
    of the stream each) over a ``res`` x ``res`` map, and a classifier."""

    def __init__(self, res: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 1)
        self.attn = CGA(32, 4, num_heads=4, attn_ratio=2, resolution=res, kernels=(3, 3, 3, 3))
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.attn(x)).mean((2, 3))


def _seeded(cls: type[nn.Module], *args, res: int) -> tuple[nn.Module, torch.Tensor]:
    """``cls(*args)`` with weights and batch-norm statistics drawn at random, in eval mode, and a batch of 2
    ``res`` x ``res`` images."""
    torch.manual_seed(0)
    model = cls(*args).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1))


def _cascade(res: int) -> tuple[nn.Module, torch.Tensor]:
    return _seeded(Cascade, res, res=res)


def _groups(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[list[tuple[int, ...]], dict[str, list[int]]]]:
    """Each group's units and the output (or input) indices it holds of each attention layer."""
    graph = StructureGraph(model, x)
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    out = {}
    for group in graph.channel_groups(layers, set(), {}):
        if group.excluded is not None:
            continue
        held = {}
        for item in group.full:
            name, label = graph._describe(item)
            if name and name.startswith("attn.") and isinstance(item.dep.target.module, nn.Conv2d):
                held[label.split(" ")[0] + (" out" if label.endswith("out)") else " in")] = sorted(
                    {int(i) for i in item.idxs}
                )
        out[f"{group.name}/{group.channels}"] = (group.unit_channels, held)
    return out


@pytest.mark.parametrize("res", [5, 2])  # 25 tokens; 4 tokens, as many as each head's key channels
def test_the_stream_holds_the_values_it_is_summed_with_and_each_head_its_queries_and_keys(res):
    """The stream's slice of each head after the first is summed with the previous head's values: those go with
    it (and the output projection's inputs they are concatenated into); the last head's values only with the
    output projection. Each head's queries go with its keys, channel for channel (with the depthwise convolution
    of its queries), and with no other head's: the scores, tokens by tokens, carry no channel to the bias table
    the heads share."""
    model, x = _cascade(res)
    assert convert_standins(model, x) == ["attn"]
    groups = _groups(model, x)
    stream_units, stream = groups["stem/32"]
    assert stream_units == [(c,) for c in range(32)]
    assert stream == {
        **{f"attn.qkvs.{h}.conv in": list(range(8)) for h in range(4)},
        **{f"attn.qkvs.{h}.conv out": list(range(8, 16)) for h in range(3)},  # heads 0-2's values
        "attn.proj.1.conv in": list(range(24)),  # ... concatenated: the first three heads' slices of 8
        "attn.proj.1.conv out": list(range(32)),  # added to the stream
    }
    for h in range(3):
        units, held = groups[f"attn.qkvs.{h}.conv/4"]  # rooted at the queries' depthwise convolution
        assert units == [(0,), (1,), (2,), (3,)]
        assert held == {f"attn.qkvs.{h}.conv out": list(range(8)), f"attn.dws.{h}.conv out": [0, 1, 2, 3]}
    units, held = groups["attn.qkvs.3.conv/16"]
    assert units == [(0, 4), (1, 5), (2, 6), (3, 7), *((v,) for v in range(8, 16))]  # a query with its key
    assert held == {
        "attn.qkvs.3.conv out": list(range(16)),
        "attn.dws.3.conv out": [0, 1, 2, 3],
        "attn.proj.1.conv in": list(range(24, 32)),  # the last head's values
    }
    assert len(groups) == 5


def test_pruned_heads_keep_widths_of_their_own_and_the_attention_biases_stay():
    model, x = _cascade(5)
    biases = model.attn.attention_biases.detach().clone()
    report = regrow.prune(model, pattern="channel", macs=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    attn = model.attn
    assert isinstance(attn, map_attention.CascadedGroupAttention)
    assert torch.equal(attn.attention_biases, biases)  # one table per head: no channel's
    keys = [dws.conv.in_channels for dws in attn.dws]
    slices = [qkv.conv.in_channels for qkv in attn.qkvs]
    values = [qkv.conv.out_channels - 2 * k for qkv, k in zip(attn.qkvs, keys)]
    assert sum(slices) == model.stem.out_channels < 32
    assert values[:3] == slices[1:]  # head h's values are summed with the stream's slice h + 1
    assert attn.proj[1].conv.in_channels == sum(values)
    assert sum(keys) < 16  # queries and keys lost channels, head by head
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def _calls(model: nn.Module, x: torch.Tensor, cls: type = CGA) -> dict[str, tuple[tuple, torch.Tensor]]:
    """What each ``cls`` module of ``model`` received and returned on its first call."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
    calls = first_calls(model, x, found)
    assert calls.keys() == found.keys()
    return calls


def _compare_calls(name: str, cls: type, standin: type, size: int, train: bool, **kwargs) -> int:
    """Run timm's ``name`` (random weights and batch-norm statistics) on a ``size`` px batch, give a ``standin`` of
    each ``cls`` module what that received and assert the same output to the bit; returns how many were compared."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).train(train)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    calls = _calls(model, x, cls)
    for module, (args, out) in calls.items():
        with torch.no_grad():
            got = standin(model.get_submodule(module)).train(train)(*args)
        assert torch.equal(got, out), (size, module)
    return len(calls)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [64, 160])  # windows of 4x4, 2x2 and 1x1; of 7x7 over a 10x10 map, padded
def test_the_stand_in_computes_timms_cascaded_attention(size, train):
    assert _compare_calls("efficientvit_m0", CGA, map_attention.CascadedGroupAttention, size, train, img_size=size)


def test_the_stand_in_reads_the_attention_biases_as_they_are_now():
    """timm caches the gathered biases per device in eval mode and empties the cache in ``train()``; the stand-in
    gathers them on every call, so biases trained after an eval pass are the ones it uses."""
    model, x = _cascade(5)
    convert_standins(model, x)
    with torch.no_grad():
        before = model(x)
        model.attn.attention_biases.add_(1.0)
        model.attn.attention_biases[0].mul_(-3.0)
        after = model(x)
    fresh, _ = _cascade(5)
    with torch.no_grad():
        fresh.attn.attention_biases.add_(1.0)
        fresh.attn.attention_biases[0].mul_(-3.0)
        assert torch.equal(after, fresh(x))  # timm's own, its cache empty
    assert not torch.equal(before, after)


def test_marks_sit_on_the_autograd_node_inside_the_trace_only():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with reading():
        flat = same_channels(x.flatten(2))
        scores = channel_free(torch.bmm(flat.transpose(1, 2), flat))
        with torch.no_grad():  # a forward without autograd has no node to mark
            assert channel_free(torch.bmm(flat.transpose(1, 2), flat)).grad_fn is None
    assert flat.grad_fn.metadata == {SAME_CHANNELS: True}
    assert scores.grad_fn.metadata == {NO_CHANNELS: True}
    # any other forward (training, evaluation, under torch.compile) marks nothing
    assert same_channels(x.flatten(2)).grad_fn.metadata == {}
    assert channel_free(torch.bmm(flat.transpose(1, 2), flat)).grad_fn.metadata == {}


class Modulation(nn.Module):
    """A stream of 16 channels through iFormer's single-head attention (8 query and key channels, 16 values and 16
    gates), and a classifier."""

    def __init__(self, window: int = 0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = SHMA(16, ratio=1, head_dim_reduction_ratio=2, window_size=window)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.attn(x)).mean((2, 3))


def _modulation(window: int = 0, size: int = 5) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Modulation(window).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_a_single_head_loses_query_channels_with_their_keys_and_values_with_their_gates():
    """timm's fused attention was one element-wise op to the trace: every query channel went with all the others
    (iformer_t: "its 512 channels can only be removed all together")."""
    model, x = _modulation()
    assert convert_standins(model, x) == ["attn"]
    groups = _groups(model, x)
    assert groups == {
        "stem/16": (
            [(c,) for c in range(16)],
            {
                "attn.v_gate.c in": list(range(16)),
                "attn.k.c in": list(range(16)),
                "attn.q.c in": list(range(16)),
                "attn.proj.c out": list(range(16)),
            },
        ),
        "attn.v_gate.c/32": (  # a value with the gate that multiplies it (chunk(2) of one projection)
            [(c, 16 + c) for c in range(16)],
            {"attn.v_gate.c out": list(range(32)), "attn.proj.c in": list(range(16))},
        ),
        "attn.q.c/8": ([(c,) for c in range(8)], {"attn.k.c out": list(range(8)), "attn.q.c out": list(range(8))}),
    }
    report = regrow.prune(model, pattern="channel", macs=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    attn = model.attn
    assert attn.q.c.out_channels == attn.k.c.out_channels < 8 and attn.scale == 8**-0.5  # the temperature stays
    assert attn.v_gate.c.out_channels == 2 * attn.proj.c.in_channels


@pytest.mark.parametrize("window", [0, 4])  # a 6x6 map: windows of 4x4, padded to 8x8
@pytest.mark.parametrize("fused", [False, True])
def test_the_stand_in_computes_timms_single_head_attention(window, fused):
    """timm's unfused path to the bit; its fused one (a kernel that sums in another order) but for rounding."""
    model, x = _modulation(window, size=6)
    model.attn.fused_attn = fused
    ((args, out),) = _calls(model, x, SHMA).values()
    with torch.no_grad():
        got = map_attention.SingleHeadModulation(model.attn).eval()(*args)
    if fused:
        torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, out)


class Partial(nn.Module):
    """A stream of 16 channels through SHViT's single-head attention over its first 6 (4 query and key channels, 6
    values), and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = SHSA(16, qk_dim=4, pdim=6)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.attn(x)).mean((2, 3))


def _partial(size: int = 5) -> tuple[nn.Module, torch.Tensor]:
    return _seeded(Partial, res=size)


@pytest.mark.parametrize("size", [5, 2])  # 25 tokens; 4 tokens, as many as the query and key channels
def test_the_head_reads_part_of_the_stream_and_its_values_go_with_the_output_projection_alone(size):
    """timm splits the stream, the projection and the output by the widths it stores: the stream and the projection
    were left out (shvit_s1: 11 groups, "split_with_sizes expects split_sizes to sum exactly to ...")."""
    model, x = _partial(size)
    assert convert_standins(model, x) == ["attn"]
    assert _groups(model, x) == {
        "stem/16": (
            [(c,) for c in range(16)],
            {
                "attn.qkv.c in": list(range(6)),  # the part the head reads
                "attn.proj.1.c in": list(range(6, 16)),  # the part that passes by, after the head's output
                "attn.proj.1.c out": list(range(16)),
            },
        ),
        "attn.qkv.c/14": (  # a query with its key; the values with the output projection's first inputs
            [(0, 4), (1, 5), (2, 6), (3, 7), *((v,) for v in range(8, 14))],
            {"attn.qkv.c out": list(range(14)), "attn.proj.1.c in": list(range(6))},
        ),
    }


def test_a_pruned_partial_head_reads_and_writes_widths_of_its_own():
    model, x = _partial()
    convert_standins(model, x)
    expected = model(x).detach()
    report = regrow.prune(model, pattern="channel", macs=0.5, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    attn = model.attn
    assert isinstance(attn, map_attention.PartialSingleHeadAttention)
    stream, part = model.stem.out_channels, attn.qkv.c.in_channels
    values = attn.proj[1].c.in_channels - (stream - part)
    assert stream < 16 and 0 < part and values > 0
    assert attn.qkv.c.out_channels - values < 8 and (attn.qkv.c.out_channels - values) % 2 == 0  # queries = keys
    assert attn.pre_norm.weight.shape == (part,) and attn.scale == 4**-0.5  # the temperature stays
    with torch.no_grad():
        assert model(x).shape == expected.shape


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [64, 224])  # maps of 2x2 and 1x1; of 7x7 and 4x4 (as many tokens as key channels)
def test_the_stand_in_computes_timms_partial_single_head_attention(size, train):
    compared = _compare_calls("shvit_s1", SHSA, map_attention.PartialSingleHeadAttention, size, train)
    assert compared == 9  # the second stage's 4 blocks and the third's 5


@pytest.mark.parametrize("name, kwargs", [("efficientvit_m0", {"img_size": 64}), ("shvit_s1", {})])
def test_the_stand_ins_compute_timms_fused_model_where_the_norms_are_folded_into_the_convolutions(name, kwargs):
    """timm's ``reparameterize_model`` replaces each convolution-and-norm module with one convolution; the stand-ins
    read their widths from either."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    original = timm.models.reparameterize_model(model)
    assert len(convert_standins(model, x)) > 0
    fused = timm.models.reparameterize_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        assert torch.equal(fused(x), original(x))


class LinearAttention(nn.Module):
    """A stream of 16 channels through EfficientViT (MIT)'s linear attention: 4 heads of 4 query, key and value
    channels each, and one further scale (a 3x3 depthwise and a grouped 1x1 convolution); and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = LITE_MLA(16, 16, dim=4, scales=(3,))
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.attn(x)).mean((2, 3))


def _linear(size: int = 5) -> tuple[nn.Module, torch.Tensor]:
    return _seeded(LinearAttention, res=size)


@pytest.mark.parametrize("size", [5, 2])  # 25 tokens; 4 tokens, as many as each head's query channels
def test_each_scale_loses_one_channel_of_every_heads_queries_keys_and_values_together(size):
    """timm splits the heads with ``reshape(B, -1, 3 * self.dim, H * W)``, which the trace could not map: the
    projection and the aggregation were left out (efficientvit_b0: 12 groups, "index 1023 reached
    _Reshape_38()"). Each scale is a group of its own: unit ``i`` is channel ``i`` of every head's queries, keys
    and values (12 channels of 48: head ``h``'s three sit at ``12 h``, ``12 h + 4`` and ``12 h + 8``), with the
    depthwise and the grouped convolution of the first scale, and the output projection's inputs that each scale's
    values write (the first 16, then the next 16)."""
    model, x = _linear(size)
    assert convert_standins(model, x) == ["attn"]
    units = [tuple(range(i, 48, 4)) for i in range(4)]
    every = list(range(48))
    assert _groups(model, x) == {
        "stem/16": (
            [(c,) for c in range(16)],
            {"attn.qkv.conv in": list(range(16)), "attn.proj.conv out": list(range(16))},
        ),
        "attn.qkv.conv/48": (
            units,
            {
                "attn.qkv.conv out": every,
                "attn.aggreg.0.0 out": every,
                "attn.aggreg.0.1 in": every,
                "attn.proj.conv in": list(range(16)),
            },
        ),
        "attn.aggreg.0.1/48": (units, {"attn.aggreg.0.1 out": every, "attn.proj.conv in": list(range(16, 32))}),
    }


def test_a_pruned_linear_attention_keeps_its_heads_and_each_scale_a_head_width_of_its_own():
    model, x = _linear()
    convert_standins(model, x)
    report = regrow.prune(model, pattern="channel", macs=0.5, round_to=1, example_inputs=x, keep_dense=False).structure
    assert report.equivalence.passed and report.equivalence.judges, report.equivalence
    assert [g["name"] for g in report.groups if g["excluded"]] == ["head"]  # the classifier's outputs, by design
    attn = model.attn
    assert isinstance(attn, map_attention.MultiScaleLinearAttention)
    first, grouped = attn.qkv.conv.out_channels, attn.aggreg[0][1]
    assert grouped.groups == 12 and first % 12 == 0 and grouped.out_channels % 12 == 0  # 4 heads, 3 parts each
    assert attn.proj.conv.in_channels == (first + grouped.out_channels) // 3  # each scale's values
    assert attn.dim == first // 12  # the first scale's head width
    assert {first, grouped.out_channels} == {24, 36}  # the seeded weights: one scale keeps 2 of 4 units, the other 3
    with torch.no_grad():
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [64, 224])  # maps of 4x4 (16 tokens, as many as each head's channels), 2x2; 14x14, 7x7
def test_the_stand_in_computes_timms_linear_attention(size, train):
    assert _compare_calls("efficientvit_b0", LITE_MLA, map_attention.MultiScaleLinearAttention, size, train) == 4


def _marked_nodes(out: torch.Tensor, mark: str) -> int:
    """How many autograd nodes behind ``out`` carry ``mark``."""
    seen, todo, found = set(), [out.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        found += bool(fn.metadata.get(mark))
        todo.extend(f for f, _ in fn.next_functions)
    return found


def test_inside_the_trace_the_stand_in_computes_the_same_head_by_head():
    """The head-by-head form runs inside regrow's trace only (its scores marked, one per head and scale); it
    computes timm's function but for rounding."""
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_b0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for module, (args, out) in _calls(model, x, LITE_MLA).items():
        original = model.get_submodule(module)
        heads = original.aggreg[0][1].groups // 3
        standin = map_attention.MultiScaleLinearAttention(original)
        with reading():
            traced = standin(*args)
        assert _marked_nodes(traced, NO_CHANNELS) == 2 * heads  # two scales
        assert _marked_nodes(standin(*args), NO_CHANNELS) == 0  # outside the trace: timm's batched form
        torch.testing.assert_close(traced.detach(), out, rtol=1e-5, atol=1e-6)
