"""Attention tied to its stream, shrunk by head offsets, and groups inside attention (regrow.structural.offsets):
the units and the rules, by hand. GCViT's real blocks: tests/test_zoo.py
(test_gcvit_streams_lose_the_same_offsets_in_every_head)."""

import torch
from torch import nn

import regrow
from regrow.structural.coupling import _Classes, _unite_heads
from regrow.structural.offsets import enclosing_attention, offset_chunks, per_head_parameters


def test_the_same_offset_of_every_head_of_a_section_goes_together():
    # a projection of two sections (keys 4 wide, values 6 wide) in 2 heads: key heads of 2, value heads of 3;
    # root channel i cuts index i
    classes = _Classes(10)
    _unite_heads(classes, {("qkv", i): i for i in range(10)}, "qkv", 2, (4, 6))
    assert classes.groups() == [(0, 2), (1, 3), (4, 7), (5, 8), (6, 9)]
    # only some indices reached (the keys' offset 0, the values' offset 1): those go together, section by section
    classes = _Classes(4)
    _unite_heads(classes, {("qkv", 0): 0, ("qkv", 2): 1, ("qkv", 5): 2, ("qkv", 7): 3}, "qkv", 2, (4, 4))
    assert classes.groups() == [(0, 1), (2, 3)]


class _Attention(nn.Module):
    head_offsets = True
    per_head_parameters = ("table",)
    num_heads = 2

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 8)
        self.proj = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.zeros(9, 2))  # relative positions x heads

    def head_sections(self) -> dict[str, tuple[int, ...]]:
        return {"qkv": (4, 4)}


def test_only_a_stream_tied_to_attention_that_follows_its_widths_goes_by_head_offsets():
    model = nn.Sequential()
    model.add_module("attn", _Attention())
    model.add_module("fc", nn.Linear(4, 4))
    inner = {"attn": {"attn.qkv"}}
    assert offset_chunks(model, ["attn"], inner, ["attn.qkv", "fc"]) == {model.attn.qkv: (2, (4, 4))}
    assert offset_chunks(model, ["attn"], inner, ["attn.qkv"]) is None  # the attention's own width: pattern 'head'
    model.attn.head_offsets = False  # an attention that splits its heads by a width it stores
    assert offset_chunks(model, ["attn"], inner, ["attn.qkv", "fc"]) is None
    model.attn.head_offsets = True
    assert [p is model.attn.table for p in per_head_parameters(model)] == [True]


def test_a_group_wholly_inside_attention_that_its_output_projection_reads_is_its_inner_width():
    inner, outputs = {"a": {"a.qkv"}, "b": {"b.q", "b.kv"}, "c": set()}, {"a": "a.proj", "b": "b.proj", "c": "c.proj"}
    # MViTv2: the pooling of each head's queries, keys and values (with its per-head position table), read by the
    # output projection
    mvit = ["a.pool_q", "a.norm_q", "a.pool_k", "a.rel_pos_h", "a.proj"]
    assert enclosing_attention(inner, outputs, mvit, ["a.proj"]) == "a"
    assert enclosing_attention(inner, outputs, [*mvit, "gamma"], ["a.proj"]) is None  # a parameter outside
    # CaiT: talking heads, one channel a head between the layers that mix them, not the output projection
    assert enclosing_attention(inner, outputs, ["a.proj_l", "a.proj_w"], ["a.proj_w"]) is None
    # PVT v2: the map it reduces for its keys and values, read by their projection
    assert enclosing_attention(inner, outputs, ["b.sr", "b.norm", "b.kv", "b.proj"], ["b.kv", "b.proj"]) is None
    # the stream the output projection writes to
    assert enclosing_attention(inner, outputs, ["a.proj", "fc2", "a.qkv", "fc1"], ["a.qkv", "fc1"]) is None
    assert enclosing_attention(inner, {"a": "ab.proj"}, ["ab.pool", "ab.proj"], ["ab.proj"]) is None  # not in "a"
    # an attention whose width goes to the probes (one head over convolutions: no projections left out)
    assert enclosing_attention(inner, outputs, ["c.pool", "c.proj"], ["c.proj"]) is None
    assert enclosing_attention(inner, {}, ["a.pool_q", "a.proj"], ["a.proj"]) is None  # no output projection known
    # the model itself is the attention
    assert enclosing_attention({"": {"qkv"}}, {"": "proj"}, ["pool_q", "proj"], ["proj"]) == ""


class LocalBranch(nn.Module):
    """Two heads whose output projection reads their outputs and a branch of the attention's own (8 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.qkv, self.local, self.proj = nn.Linear(16, 48), nn.Linear(16, 8), nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        heads = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return x + self.proj(torch.cat([heads, torch.relu(self.local(x))], dim=-1))


def test_a_branch_inside_attention_beside_its_heads_still_prunes():
    # the output projection of an attention whose heads pattern 'head' cannot take (it reads more than their
    # outputs) does not make what it reads the attention's width: the branch shrank before the rule and still does
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", LocalBranch())
    model.add_module("head", nn.Linear(16, 4))
    x = torch.randn(2, 5, 16)
    report = regrow.prune(model, pattern="channel", sparsity=0.5, example_inputs=x, keep_dense=False).structure
    branch = [g for g in report.groups if g["name"] == "attn.local"]
    assert len(branch) == 1 and branch[0]["excluded"] is None, branch
    assert report.equivalence.passed and model.attn.local.out_features < 8
    assert model.attn.proj.in_features == 16 + model.attn.local.out_features
