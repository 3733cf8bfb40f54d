"""What a recipe may say: every combination of settings that is refused, in one list.

Each value is checked where it is declared (:mod:`regrow.config.schema`, field by field); the settings that are
each valid but do not work together are the rules below. :func:`regrow.config.validate` applies them, in
order, to every :class:`~regrow.config.RunConfig` it makes, so they run before anything is loaded or
trained, for a recipe file, a dict, a saved ``config.yaml`` and what strategy auto chooses alike. The
first rule that fails raises a :class:`~regrow.errors.RegrowError` with its one-paragraph message.

docs/recipes.md ("Settings refused together") lists the rules from this module: each rule's one-line
``doc`` is a list item, and a test keeps that list equal to :func:`rules_markdown`. What needs the real
model or data (a target that matches no parameter, labels outside the model's outputs) is checked by the
run's check stage, :mod:`regrow.pipeline.check`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from regrow.config.schema import RunConfig
from regrow.errors import RegrowError

Check = Callable[[RunConfig], Iterator[str]]


@dataclass(frozen=True)
class Rule:
    """One refused combination: ``check`` yields the message of each way the config breaks it."""

    doc: str
    check: Check


RULES: list[Rule] = []


def rule(doc: str) -> Callable[[Check], Check]:
    """Register a check, documented by ``doc`` (one Markdown line for docs/recipes.md)."""

    def add(check: Check) -> Check:
        RULES.append(Rule(" ".join(doc.split()), check))
        return check

    return add


def check_config(cfg: RunConfig) -> None:
    """Apply every rule in order; the first message raises."""
    for r in RULES:
        for message in r.check(cfg):
            raise RegrowError(message)


def rules_markdown() -> str:
    """The rules as the Markdown list docs/recipes.md carries."""
    return "\n".join(f"- {r.doc}" for r in RULES) + "\n"


def _pattern(cfg: RunConfig) -> tuple[str, bool]:
    """The pattern's canonical name, and whether it shrinks the model."""
    from regrow.patterns import get_pattern

    pattern = get_pattern(cfg.prune.resolved_pattern)
    return pattern.name, pattern.structural


def _new_task(cfg: RunConfig) -> str | None:
    """How the recipe names a transfer to a new task with a new head, or None."""
    if cfg.recover.method == "transfer":
        return "method 'transfer'"
    if cfg.model.train is not None and cfg.model.train.data is not None:
        return "a run with model.train.data (a new task)"
    return None


# -------------------------------------------------------------------------------------------------
# Schedules


@rule(
    "`schedule: iterative` or `gradual` with `prune.threshold` (they raise a sparsity step by step); `gradual` "
    "with `channel` / `head` (use `iterative`); either with an `n:m` pattern (it fixes the sparsity); either "
    "with `recover.epochs: 0`, and `iterative` with fewer recovery epochs than rounds."
)
def _schedule(cfg: RunConfig) -> Iterator[str]:
    name = cfg.schedule.name
    if name == "one_shot":
        return
    pattern, structural = _pattern(cfg)
    if not structural and cfg.prune.threshold is not None:
        yield f"schedule {name!r} raises the sparsity step by step and needs prune.sparsity, not prune.threshold."
    elif name == "gradual" and structural:
        yield (
            f"schedule 'gradual' raises a mask's sparsity between steps; pattern {pattern!r} shrinks the model, "
            "so use schedule 'iterative' (shrink a little, recover, repeat) or 'one_shot'."
        )
    elif not structural and pattern != "unstructured":
        yield (
            f"schedule {name!r} works with pattern 'unstructured'; pattern {pattern!r} fixes its "
            "sparsity, use schedule 'one_shot'."
        )
    elif cfg.recover.epochs < 1:
        yield f"schedule {name!r} prunes during recovery and needs recover.epochs >= 1."
    elif name == "iterative" and cfg.recover.epochs < cfg.schedule.rounds:
        yield (
            f"schedule 'iterative' with {cfg.schedule.rounds} rounds needs at least one recovery epoch per "
            f"round; recover.epochs is {cfg.recover.epochs}."
        )


# -------------------------------------------------------------------------------------------------
# Recovery methods, rewinding and criteria against the pattern


@rule(
    "`rigl` / `set` with a pattern other than `unstructured` (they move single weights); in Python, with masks "
    "whose spec has another pattern."
)
def _dynamic_needs_unstructured(cfg: RunConfig) -> Iterator[str]:
    pattern, _ = _pattern(cfg)
    method = cfg.recover.method
    if method in ("rigl", "set") and pattern != "unstructured":
        yield (
            f"recover.method {method!r} drops and regrows single weights anywhere in a tensor, so it needs "
            f"pattern 'unstructured'; pattern {pattern!r} would be broken or left unchanged. Use method "
            "'distill' or 'finetune'."
        )


@rule("`prune.max_sparsity` below `prune.sparsity` for masks (no target may lose that much, so all together cannot).")
def _cap_reaches_the_budget(cfg: RunConfig) -> Iterator[str]:
    p = cfg.prune
    _, structural = _pattern(cfg)
    if not structural and None not in (p.max_sparsity, p.sparsity) and p.max_sparsity < p.sparsity:  # type: ignore[operator]
        yield (
            f"prune.max_sparsity {p.max_sparsity:g} is below prune.sparsity {p.sparsity:g}: no target may lose more "
            f"than {p.max_sparsity:g} of its weights, so all together cannot lose {p.sparsity:g}. Raise max_sparsity "
            "to at least the sparsity, or leave it out (default: 0.99, with scope global 1 - half the overall density)."
        )


@rule("`rewind: weights` with `channel` / `head` (the snapshot has the original shapes).")
def _rewind_weights_keeps_shapes(cfg: RunConfig) -> Iterator[str]:
    pattern, structural = _pattern(cfg)
    if cfg.recover.rewind == "weights" and structural:
        yield (
            f"recover.rewind 'weights' resets weights to a snapshot of the original shapes; pattern {pattern!r} "
            "shrinks the model, so only rewind 'lr' applies."
        )


@rule("`rewind` with an `lr_schedule` other than `cosine` (rewinding replays the original schedule instead).")
def _rewind_replays_its_schedule(cfg: RunConfig) -> Iterator[str]:
    r = cfg.recover
    if r.rewind != "none" and "lr_schedule" in r.model_fields_set and r.lr_schedule != "cosine":
        yield (
            f"recover.rewind {r.rewind!r} replays the original training's learning-rate schedule, so "
            f"recover.lr_schedule {r.lr_schedule!r} would be ignored: give one of the two."
        )


@rule("`criterion: bn_scale` with a pattern other than `channel` (it scores whole channels).")
def _bn_scale_scores_channels(cfg: RunConfig) -> Iterator[str]:
    pattern, _ = _pattern(cfg)
    if cfg.prune.criterion == "bn_scale" and pattern != "channel":
        yield (
            f"criterion 'bn_scale' scores whole channels by their BatchNorm scale; it needs pattern 'channel', "
            f"not {pattern!r}. Allowed criteria here: magnitude, random, taylor."
        )


@rule("`prune.within` with a masked pattern, or with schedule `iterative` (its rounds budget the whole model).")
def _within(cfg: RunConfig) -> Iterator[str]:
    pattern, structural = _pattern(cfg)
    within = cfg.prune.within
    if within is None:
        return
    if not structural:
        yield (
            f"prune.within scopes the budget of a structural pattern (channel, head, channel+head); pattern "
            f"{pattern!r} counts only its targets already: choose the part with prune.targets (e.g. '{within}.*')."
        )
    elif cfg.schedule.name == "iterative":
        yield (
            "prune.within with schedule 'iterative' is not supported: the rounds share out a budget of the whole "
            "model. Use schedule 'one_shot', or leave prune.within out."
        )


@rule(
    "`recover.objective.kind: embedding` with what is measured on labels: `sensitivity.enabled`, `prune.allocation` "
    "`sensitivity` / `search`, `strategy: auto`, `criterion: taylor`, `model.train`, a transfer (`model.train.data`, "
    "`method: transfer`) or `accelerate.enabled`."
)
def _embedding_needs_no_labels(cfg: RunConfig) -> Iterator[str]:
    if cfg.recover.objective.kind == "labels":
        return
    p = cfg.prune
    asked = [
        *(["sensitivity.enabled"] if cfg.sensitivity.enabled else []),
        *([f"prune.allocation {p.allocation!r}"] if p.allocation in ("sensitivity", "search") else []),
        *(["strategy: auto"] if cfg.auto() else []),
        *(["criterion 'taylor'"] if p.criterion == "taylor" else []),
        *(["model.train"] if cfg.model.train is not None else []),
        *(["method 'transfer'"] if cfg.recover.method == "transfer" else []),
        *(["accelerate.enabled"] if cfg.accelerate.enabled else []),
    ]
    if asked:
        yield (
            f"recover.objective.kind 'embedding' trains and measures without labels, but {', '.join(asked)} "
            "scores the model on labels. Leave them out (the embedding is measured against the dense model's), or "
            "use objective kind 'labels' with labelled data."
        )


@rule("A calibrated criterion (`wanda`, `sparsegpt`) with a structural pattern, or `calibration` without one.")
def _calibrated_masks(cfg: RunConfig) -> Iterator[str]:
    from regrow.criteria import is_calibrated

    pattern, _ = _pattern(cfg)
    p = cfg.prune
    if is_calibrated(p.criterion) and pattern in ("channel", "head", "channel+head"):
        yield (
            f"criterion {p.criterion!r} prunes single weights layer by layer from calibration inputs; it needs "
            f"pattern 'unstructured' or an n:m pattern such as '2:4', not {pattern!r}. Allowed criteria for "
            f"{pattern!r}: magnitude, random, taylor" + (", bn_scale." if pattern == "channel" else ".")
        )
    if p.calibration is not None and not is_calibrated(p.criterion):
        yield (
            f"prune.calibration configures the calibrated criteria (wanda, sparsegpt); criterion {p.criterion!r} "
            "takes none. Remove prune.calibration, or set prune.criterion to wanda or sparsegpt."
        )
    if p.criterion == "sparsegpt" and p.threshold is not None:
        yield (
            "criterion 'sparsegpt' updates the weights it keeps, so a threshold on its scores means nothing; "
            "give sparsity."
        )


@rule("`schedule.initial` at or above the target sparsity (the gradual ramp rises from it).")
def _gradual_rises(cfg: RunConfig) -> Iterator[str]:
    sparsity = cfg.prune.sparsity
    if cfg.schedule.name == "gradual" and sparsity is not None and cfg.schedule.initial >= sparsity:
        yield (
            f"schedule.initial ({cfg.schedule.initial:g}) must be below the target sparsity ({sparsity:g}): "
            "the gradual ramp rises from initial to the target."
        )


@rule("`prune.clamps` without `prune.allocation` `uniform`, `sensitivity` or `search` (clamps bound a plan).")
def _clamps_bound_a_plan(cfg: RunConfig) -> Iterator[str]:
    p = cfg.prune
    if p.clamps and p.allocation not in ("uniform", "sensitivity", "search"):
        yield (
            "prune.clamps bound the per-target sparsities that an allocation plans; give prune.allocation "
            "(uniform, sensitivity or search) too, or leave clamps out."
        )


@rule("A `latency` budget with `schedule: iterative` (a latency budget is measured, in one shot).")
def _latency_in_one_shot(cfg: RunConfig) -> Iterator[str]:
    if cfg.prune.latency is not None and cfg.schedule.name == "iterative":
        yield (
            "a latency budget is met in one shot (it is measured, not planned round by round): use schedule "
            "'one_shot', or give a macs budget for iterative rounds."
        )


# -------------------------------------------------------------------------------------------------
# Transfer to a new task


@rule(
    "`method: transfer`, or any run with `model.train.data` (a new task with a new head), with `distill: true`, "
    "`stop_when.within` (there is no dense baseline on the new task) or `rewind: weights` (the snapshot has "
    "the source head)."
)
def _transfer(cfg: RunConfig) -> Iterator[str]:
    r = cfg.recover
    what = _new_task(cfg)
    if what is None:
        return
    if r.distill:
        yield (
            f"recover.distill: true does not apply to {what}: the source model's logits are for other "
            "classes; method 'transfer' distills its features instead (recover.feature_weight)."
        )
    if r.stop_when is not None and r.stop_when.within is not None:
        yield (
            f"recover.stop_when.within compares with the baseline's accuracy on the same task; {what} has no "
            "dense baseline on the new task to compare with. Use stop_when.seconds or recover.epochs."
        )
    if r.rewind == "weights":
        yield (
            "recover.rewind 'weights' resets the model to a snapshot of the source model, whose head is for "
            f"the source classes; {what} gives it a new head. Use rewind 'lr' or 'none'."
        )


@rule(
    "`method: share` with `schedule: gradual`: sharing clusters the surviving weights once, and the ramp would "
    "prune some of them later; use `share.after: true` with another method instead. In Python, "
    '`method="share"` beside a `GradualPruning` callback.'
)
def _share_once(cfg: RunConfig) -> Iterator[str]:
    if cfg.recover.method == "share" and cfg.schedule.name == "gradual":
        yield (
            "recover.method 'share' clusters the surviving weights once, at the start of recovery; schedule "
            "'gradual' prunes more of them during recovery, and the clusters would bring them back. Use schedule "
            "'one_shot' or 'iterative' with 'share', or recover with another method and set recover.share.after: "
            "true."
        )


@rule(
    "`stop_when.within` for a built-in model that is neither trained (`model.train`) nor loaded "
    "(`model.checkpoint`): its baseline would be an untrained network."
)
def _within_needs_a_baseline(cfg: RunConfig) -> Iterator[str]:
    r, m = cfg.recover, cfg.model
    if r.stop_when is not None and r.stop_when.within is not None and m.train is None:
        if m.checkpoint is None and m.name is not None:
            yield (
                f"recover.stop_when.within compares with the baseline's accuracy, but the built-in model "
                f"{m.name!r} is neither trained here (model.train) nor loaded (model.checkpoint): its "
                "baseline is an untrained network. Train or load it, or use stop_when.seconds or recover.epochs."
            )


@rule(
    "Keys that would be ignored: `max_lr` without `one_cycle`, `rewind_checkpoint` without `rewind: weights`, "
    "`dynamic.*` without `rigl` / `set`, `share.k` / `share.epochs` without `share` or `share.after`."
)
def _ignored_keys(cfg: RunConfig) -> Iterator[str]:
    r = cfg.recover
    ignored = [  # (key, when it would be ignored, what it applies to)
        ("recover.max_lr", r.max_lr is not None and r.lr_schedule != "one_cycle", "lr_schedule 'one_cycle'"),
        ("recover.rewind_checkpoint", r.rewind_checkpoint is not None and r.rewind != "weights", "rewind 'weights'"),
        # compared with the defaults, not with the keys given: a saved config.yaml states every key
        (
            "recover.dynamic",
            r.dynamic != type(r.dynamic)() and r.method not in ("rigl", "set"),
            "method 'rigl' or 'set'",
        ),
        (
            "recover.share",
            _share_set(cfg) and r.method != "share" and not r.share.after,
            "method 'share' or share.after: true",
        ),
    ]
    for key, unused, use in ignored:
        if unused:
            yield (
                f"{key} is given but applies only to {use}, which this recipe does not use, so it would be "
                f"ignored. Remove {key}, or use {use}."
            )


def _share_set(cfg: RunConfig) -> bool:
    """Whether share.k or share.epochs differ from their defaults (share.after says when, not how)."""
    share = cfg.recover.share
    return share.model_copy(update={"after": False}) != type(share)()


@rule("A `rewind_epoch` outside the original training (stated, the baseline's, or assumed).")
def _rewind_point_inside(cfg: RunConfig) -> Iterator[str]:
    from regrow.recovery.lr import default_original

    r = cfg.recover
    if r.rewind == "none" or r.rewind_epoch is None:
        return
    # the same original schedule the run hands to recover(): stated, else the baseline's, else assumed
    if r.original is not None:
        original_epochs, where = float(r.original.epochs), "recover.original.epochs"
    elif cfg.model.train is not None:
        original_epochs, where = float(cfg.model.train.epochs), "model.train.epochs"
    else:
        original_epochs = default_original(r.lr, r.epochs).epochs
        where = "the assumed original schedule (twice recover.epochs)"
    if r.rewind_epoch >= original_epochs:
        yield (
            f"recover.rewind_epoch {r.rewind_epoch:g} is not inside the original training ({original_epochs:g} "
            f"epochs, from {where}); give a rewind point from 0 to below {original_epochs:g}."
        )


@rule("`recover.compile: true` with `method: transfer` (its feature hook follows the model on every step).")
def _transfer_is_not_compiled(cfg: RunConfig) -> Iterator[str]:
    if cfg.recover.compile and cfg.recover.method == "transfer":
        yield (
            "compile=True does not apply to method 'transfer': its feature distillation hooks the model's classifier "
            "on every step, which a compiled model cannot follow. Use compile=False, or method 'finetune'."
        )


@rule(
    "`model.train.data` (a transfer to a new head) with `method: distill`: the source model's logits cannot "
    "teach the new classes; use `transfer` or `finetune`."
)
def _transfer_is_not_distill(cfg: RunConfig) -> Iterator[str]:
    if cfg.model.train is not None and cfg.model.train.data is not None and cfg.recover.method == "distill":
        yield (
            "with model.train.data the model is transferred to a new task with a new head, so the "
            "source model's logits cannot teach it: use recover.method 'transfer' (feature "
            "distillation) or 'finetune'."
        )


@rule(
    "`prune.keep_dense: false` with what needs the dense model: `method: distill` or `transfer`, `recover.distill`, "
    "the `embedding` objective, or `strategy: auto` (it may choose distillation)."
)
def _needs_the_dense_copy(cfg: RunConfig) -> Iterator[str]:
    if cfg.prune.keep_dense:
        return
    r = cfg.recover
    asked = [
        *([f"recover.method {r.method!r}"] if r.method in ("distill", "transfer") else []),
        *(["recover.distill"] if r.distill else []),
        *(["recover.objective.kind 'embedding'"] if r.objective.kind == "embedding" else []),
        *(["strategy: auto"] if cfg.auto() else []),
    ]
    if asked:
        yield (
            f"prune.keep_dense false keeps no copy of the dense model, but {', '.join(asked)} learns from or "
            "measures against it. Use recover.method 'finetune' (or rigl, set, share) with the labels objective, "
            "or keep the dense copy (prune.keep_dense true, the default)."
        )


@rule(
    "`rewind: weights` with neither a `rewind_checkpoint` nor a baseline that regrow trains (`model.train`), "
    "which keeps the weights at the rewind point itself."
)
def _rewind_weights_has_weights(cfg: RunConfig) -> Iterator[str]:
    r = cfg.recover
    if r.rewind == "weights" and r.rewind_checkpoint is None and cfg.model.train is None:
        yield (
            "recover.rewind 'weights' needs the weights at the rewind point: give recover.rewind_checkpoint "
            "(a safetensors file), or let regrow train the baseline (model.train) and keep them itself."
        )


@rule(
    "`accelerate.enabled` with a pattern other than `2:4`, or on a run whose device is not CUDA (there are no "
    "semi-structured sparse kernels for the CPU)."
)
def _accelerate_needs_2_4_on_cuda(cfg: RunConfig) -> Iterator[str]:
    import torch

    if not cfg.accelerate.enabled:
        return
    pattern, _ = _pattern(cfg)
    if pattern != "2:4":
        yield (
            f"accelerate.enabled packs 2:4 weights for sparse tensor cores; pattern {pattern!r} has no 2:4 weights. "
            "Use prune.pattern '2:4', or leave accelerate out."
        )
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if not cuda:
        from regrow.accelerate import CPU_MESSAGE

        yield f"accelerate.enabled needs a CUDA device (recipe device: {cfg.device!r}). {CPU_MESSAGE}"
