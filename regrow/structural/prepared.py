"""The prunable groups of one model, found, probed and scored: the steps of ``regrow.structural.prepare``.

Channels: the coupled groups of torch-pruning's dependency graph; heads: one group per attention module.
Each group is probed (one unit removed on a copy and checked against its simulation) and a group regrow
cannot shrink correctly is left out with the reason; the others are scored for the budget search.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from regrow.batches import forward, to_device, unpack
from regrow.errors import RegrowError, first_line
from regrow.select import resolve_targets
from regrow.structural.arch import _class_name, tied_parameters
from regrow.structural.budget import Unitized
from regrow.structural.device import copy_grads, exact_arithmetic, inputs_to_host
from regrow.structural.graph import TRANSPOSED_CONV, ChannelGroup, StructureGraph, find_attention
from regrow.structural.heads import FUSED, SEPARATE, SEPARATE_KV, HeadGroup, SectionedHeads, head_group
from regrow.structural.importance import accumulate_gradients, channel_scores, head_scores
from regrow.structural.mlp import MlpGroup
from regrow.structural.rounding import _round_step
from regrow.structural.units import Compare, _apply, _breaks_ties, _probe_all, _Unit
from regrow.timelimit import time_limit

NO_ATTENTION = (
    "pattern 'head' found no attention module: regrow prunes heads of nn.MultiheadAttention and of "
    "modules that declare num_heads (or num_attention_heads, n_heads, n_head, heads)."
)


@dataclass
class Prepared:
    """The prunable groups of one model, probed and scored: what budgets and sensitivity work from."""

    pattern: str
    criterion: str
    units: list[_Unit]
    active: list[_Unit]
    scores: list[Unitized]
    inputs: Any
    one: Any
    converted: list[str]
    standins: list[str]  # torchvision / timm modules swapped for regrow's stand-ins (regrow.structural.standins)
    host: nn.Module  # where regrow's own forward passes run: the model itself on the CPU, else a CPU copy
    host_inputs: Any

    @property
    def host_one(self) -> Any:
        return _one_sample(self.host_inputs)

    def apply(self, model: nn.Module, removed: dict[str, list[int]]) -> None:
        """Shrink ``model`` (this model or a copy of it) by removing the given units of each group."""
        _apply(model, self.active, removed)


def _example_inputs(data: Iterable[Any] | None, example_inputs: Any, device: torch.device) -> Any:
    """``example_inputs``, else the inputs of the first batch of ``data``, on ``device``."""
    if example_inputs is None:
        if data is None:
            raise RegrowError(
                "structural patterns trace the model and need inputs: pass data= (batches of (inputs, targets)) "
                "or example_inputs=."
            )
        for batch in data:
            example_inputs, _ = unpack(batch)
            break
        else:
            raise RegrowError(
                "the data iterable is empty; structural pruning needs one batch of inputs to trace the model."
            )
    return to_device(example_inputs, device)


def _one_sample(inputs: Any) -> Any:
    """The first sample of a batch of inputs (a tensor or a dict of tensors), kept as a batch of one."""
    if isinstance(inputs, dict):
        return {k: v[:1] for k, v in inputs.items()}
    return inputs[:1]


def split_entries(entries: Any, attention: dict[str, nn.Module], params: Iterable[str] = ()) -> tuple[Any, Any]:
    """Glob ``entries`` split into (those naming attention modules, those naming weights): an entry that names
    both (``"encoder.*"``) goes to both sides, one that names neither to the weights' (whose check names it).
    None stays None on both sides, and a side left with no entries is None (its default)."""
    if entries is None:
        return None, None
    listed = [entries] if isinstance(entries, str) else list(entries)
    names = list(params)
    heads = [e for e in listed if any(fnmatchcase(n, e) for n in attention)]
    rest = [e for e in listed if e not in heads or any(fnmatchcase(n, e) for n in names)]
    return heads or None, rest or None


def _head_candidates(attention: dict[str, nn.Module], targets: Any, ignore: Any) -> set[str]:
    """Names of the attention modules that ``targets`` and ``ignore`` (globs) leave to prune."""
    names = set(attention)
    chosen = set(names)
    if targets is not None:
        entries = [targets] if isinstance(targets, str) else list(targets)
        chosen = set()
        for entry in entries:
            hits = {n for n in names if fnmatchcase(n, entry)}
            if not hits:
                raise RegrowError(
                    f"targets entry {entry!r} matches no attention module; attention modules: {sorted(names)}."
                )
            chosen |= hits
    for entry in [ignore] if isinstance(ignore, str) else list(ignore or []):
        hits = {n for n in names if fnmatchcase(n, entry)}
        if not hits:
            raise RegrowError(
                f"ignore entry {entry!r} matches no attention module; attention modules: {sorted(names)}."
            )
        chosen -= hits
    return chosen


def validate_request(model: nn.Module, pattern: str, targets: Any = None, ignore: Any = None) -> None:
    """Check names against the model before any work (no tracing): targets, ignore, attention modules."""
    if pattern == "channel":
        resolve_targets(model, targets, ignore)
        return
    attention = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    attention.update(find_attention(model))
    if not attention:
        raise RegrowError(NO_ATTENTION)
    if pattern == "channel+head":  # entries naming attention modules choose heads, the others weights
        params = [n for n, _ in model.named_parameters()]
        (head_targets, channel_targets), (head_ignore, channel_ignore) = (
            split_entries(targets, attention, params),
            split_entries(ignore, attention, params),
        )
        resolve_targets(model, channel_targets, channel_ignore)
        _head_candidates(attention, head_targets, head_ignore)
        return
    _head_candidates(attention, targets, ignore)


GRAPH_SECONDS = 300.0  # the longest regrow waits for the dependency graph and its groups


def _channel_groups(
    model: nn.Module, attention: dict[str, nn.Module], inputs: Any, targets: Any, ignore: Any
) -> tuple[StructureGraph, list[ChannelGroup | HeadGroup]]:
    """Trace ``model`` and return its dependency graph and the coupled channel groups among the targets.

    The inner projections of attention modules are left to the graph as ``inner`` widths: their channels are
    tied to the heads, which pattern 'head' removes.
    """
    fqns = resolve_targets(model, targets, ignore)
    candidates = {f.rpartition(".")[0] if f.endswith(".weight") else f for f in fqns}
    ignored = set()
    if ignore is not None:
        ignored = {f.rpartition(".")[0] for f in resolve_targets(model, ignore)}
    if targets is None:  # upsampling layers too (the default targets are the layers every pattern knows)
        candidates |= {n for n, m in model.named_modules() if isinstance(m, TRANSPOSED_CONV) and n not in ignored}
    explain = (
        f"the structural dependency graph of this model (torch-pruning) was not built within {GRAPH_SECONDS:g} s, "
        "so channel pruning stopped instead of hanging. Prune fewer layers with targets= / ignore=, remove heads "
        "with pattern 'head', or use pattern 'unstructured' or '2:4'."
    )
    with time_limit(GRAPH_SECONDS, explain):
        graph = StructureGraph(model, inputs)
        inner, unheaded, outputs = {}, {}, {}
        for name, module in attention.items():
            hg = head_group(name, module, model)
            inner[name] = inner_projections(hg, module)
            if "out" in hg.projections and hg.excluded is None:  # it reads the heads' outputs, and nothing else
                outputs[name] = hg.projections["out"]
            hg.excluded = hg.excluded or _single_unit(hg)  # multi-query: pattern 'head' cannot shrink it either
            if hg.excluded is not None:
                unheaded[name] = hg.excluded
        return graph, list(graph.channel_groups(candidates, ignored, inner, unheaded, outputs))


STANDINS = "regrow.structural.timm_attention"  # regrow's stand-ins for timm's attention: widths from the tensors
# Layers whose outputs an attention splits into heads by widths it stores, which head_group does not find: the fused
# q / k / v convolution of LowFormer's and CPUBone's attention (also where it has one head: it reshapes by its
# stored head width, and every probe of its channels failed), the Linear layer of VOLO's outlook attention that
# computes its weights (heads x window x window a position: no channels), and EfficientFormerV2's q / k / v
# convolutions, each inside a ConvNorm. Their groups are the attention's inner width, left out before any probe.
# By the original class's module and name (or a class it derives from); timm is not imported.
SPLIT_INTO_HEADS = {
    "timm.models.lowformer.ConvAttention": ("pwise",),
    "timm.models.cpubone.ConvAttention": ("pwise",),
    "timm.models.volo.OutlookAttention": ("attn",),
    "timm.models.efficientformer_v2.Attention2d": ("q.conv", "k.conv", "v.conv"),
    "timm.models.efficientformer_v2.Attention2dDownsample": ("q.proj.conv", "k.conv", "v.conv"),
}
# The names of the layers that compute queries, keys and values: head_group's roles, and a fused query / key
# projection (timm's ConViT and TNT: ``qk``, then ``v``)
QKV_NAMES = {*FUSED, *(n for names in (*SEPARATE, *SEPARATE_KV) for n in names), "qk"}


def inner_projections(group: HeadGroup, module: nn.Module) -> set[str]:
    """The layers (full names) that compute the attention's queries, keys and values, whose output channels it
    splits into heads: the head group's projections (with multi-query attention, the key and value ones its heads
    share too); where :func:`head_group` found none (1x1 convolutions as
    projections, timm's HaloNet and Visformer; a fused query / key projection, ConViT and TNT), the attention's
    own Linear and convolution children named as such layers are. With them, whatever its heads, the layers of
    an attention in :data:`SPLIT_INTO_HEADS`.

    None where the attention has a single query head and reads every width from its tensors, keeping its scale:
    one head's width is free, so its channels go to the probes (pattern 'head' cannot remove a single head). That
    holds for an attention whose q / k / v layers are convolutions and for regrow's own timm stand-ins with
    separate q / k / v or q / kv projections (PVT v2's first stage, Next-ViT). Other single heads keep their width
    out, saying why pattern 'head' cannot take them: a fused qkv splits it in three equal parts, which the channel
    graph does not keep equal (timm's Swin, Hiera, MViTv2, MaxViT); Hugging Face's classes split heads by a head
    width they store (BERT, Llama, OPT, T5, ViT: every probe failed), as ConViT's fused query / key does; and
    attention that leaves its scale to ``scaled_dot_product_attention``'s default, one over the root of q's width,
    would attend at another temperature than its simulation once narrower, by too little for a probe of one
    channel to see."""
    prefix = f"{group.name}." if group.name else ""
    original = getattr(module, "_original", None) or type(module)  # a stand-in's (regrow.structural.timm_attention)
    kinds = (_class_name(c) for c in original.__mro__)  # the class or one it derives from
    split = {prefix + n for n in next((SPLIT_INTO_HEADS[k] for k in kinds if k in SPLIT_INTO_HEADS), ())}
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    named = {prefix + n: c for n, c in module.named_children() if n in QKV_NAMES and isinstance(c, layers)}
    if group.heads <= 1:
        own = type(module).__module__ == STANDINS and "qkv" not in group.projections
        convolutions = not group.projections and not any(isinstance(c, nn.Linear) for c in named.values())
        if own or convolutions:
            return split
    if group.projections:
        shared = group.shared if isinstance(group, SectionedHeads) else ()
        return {fqn for role, fqn in group.projections.items() if role != "out"} | set(shared) | split
    return set(named) | split


def _head_groups(model: nn.Module, attention: dict[str, nn.Module], targets: Any, ignore: Any) -> list[HeadGroup]:
    """One head group per attention module; those that are not targets or have one head are excluded."""
    chosen = _head_candidates(attention, targets, ignore)
    if not attention:
        raise RegrowError(NO_ATTENTION)
    groups = []
    for name in sorted(attention):
        g = head_group(name, attention[name], model)
        if name not in chosen:
            g.excluded = g.excluded or "not a target"
        else:
            g.excluded = g.excluded or _single_unit(g)
        groups.append(g)
    return groups


def _single_unit(group: HeadGroup) -> str | None:
    """Why pattern 'head' cannot remove any unit of the group: one head, or one key/value head that all its query
    heads share (multi-query attention)."""
    if group.units >= 2:
        return None
    return "it has a single head" if group.kv_group == 1 else "it has a single key/value head"


def _probe_units(model: nn.Module, units: list[_Unit], inputs: Any, pattern: str, compare: Compare) -> None:
    """Exclude, with the reason, every group that cannot be shrunk correctly; raise when none is left.

    ``model`` is the CPU copy (regrow.structural.device): a probe may run a wrong surgery.
    """
    ties = tied_parameters(model)
    candidates = [u for u in units if u.group.excluded is None]
    with exact_arithmetic():
        faults = _probe_all(model, candidates, inputs, compare)
    for u in candidates:
        u.group.excluded = faults.get(u.name) or _breaks_ties(model, u, ties)
    if not any(u.group.excluded is None for u in units):
        reasons = "; ".join(f"{u.name}: {u.group.excluded}" for u in units if u.group.excluded != "not a target")
        raise RegrowError(
            f"no group can be pruned with pattern {pattern!r}" + (f" ({reasons})" if reasons else "") + "."
        )


def _score_units(
    model: nn.Module,
    units: list[_Unit],
    criterion: str,
    round_to: int | None,
    auto: int,
    round_widths: dict[str, int] | None,
) -> list[Unitized]:
    """Score the units of every group still in; a channel group the criterion cannot score is excluded.

    Criterion taylor reads the gradients already in ``.grad`` (:func:`_taylor_gradients`).
    """
    scored = []
    for u in units:
        if u.group.excluded is not None:
            continue
        if isinstance(u.group, ChannelGroup):
            s = channel_scores(u.group, criterion)
            if s is None:
                u.group.excluded = f"criterion {criterion!r} finds nothing to score in it"
                continue
            step = _round_step(u.group, round_to, auto, round_widths)
            parts = u.parts
        else:  # heads; or FFN channels found without a graph, which round like any channels
            s = head_scores(u.group, model, criterion)
            step = _round_step(u.group, round_to, auto, round_widths) if isinstance(u.group, MlpGroup) else 1
            parts = ()
        scored.append(Unitized(u.name, u.group.units, s, step, parts=parts))
    return scored


def _taylor_gradients(model: nn.Module, host: nn.Module, data: Iterable[Any] | None) -> None:
    """Gradients for taylor scores, computed where the model is and handed to its CPU copy."""
    accumulate_gradients(model, data)
    copy_grads(model, host)


def _host_inputs(model: nn.Module, host: nn.Module, inputs: Any) -> Any:
    """``inputs`` on the CPU for the CPU copy ``host`` of ``model``, which must run there."""
    if host is model:
        return inputs
    moved = inputs_to_host(inputs)
    try:
        with torch.no_grad():
            forward(host, moved)
    except Exception as exc:  # noqa: BLE001 - the user's forward; say why it matters in one line
        raise RegrowError(
            "structural pruning runs its probes and checks on a CPU copy of the model (a failed probe on a GPU can "
            "poison the whole CUDA context), but this model does not run on the CPU "
            f"({first_line(exc)})."
        ) from None
    return moved
