"""``regrow.run``: baseline -> prune -> recover -> report -> export, each stage a plain function call."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import nn

from regrow.batches import check_batch, forward, to_device, unpack
from regrow.components import build_augment, build_data, build_model, device_of, find_file, search_path
from regrow.config import RunConfig, apply_overrides, load_config, settle_strategy, validate
from regrow.data.split import split_validation
from regrow.errors import RegrowError
from regrow.io import RUN_FILES, atomic_write_text, prepare_out_dir, staged_out_dir
from regrow.masks import MaskSet
from regrow.measure import Snapshot, evaluate, sample_inputs
from regrow.measure.cost import count_params, dense_macs
from regrow.measure.latency import compare_latency
from regrow.measure.metrics import classification_metrics
from regrow.patterns import get_pattern
from regrow.prune import PruneSpec, compute_masks, frozen_copy, plan, prune, speed_warning, structural_masks
from regrow.recovery import GradualPruning, RecoveryResult, new_head, read_rewind_state, recover
from regrow.recovery.lr import OriginalSchedule, default_original, rewind_plan
from regrow.report import RunReport, environment
from regrow.report.plots import plot_curve
from regrow.schedules import iterative
from regrow.select import final_classifier
from regrow.structural import load, save, validate_request

log = logging.getLogger("regrow")


P = ParamSpec("P")
R = TypeVar("R")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch.

    The pipeline reseeds before each stage that draws random numbers (baseline training, pruning,
    recovery), so that measuring more or less (e.g. latency on or off, which iterates loaders and so
    draws seeds) never changes what is trained.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reproducible_kernels(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with cuDNN's deterministic algorithms, then restore the caller's settings.

    On a GPU, cuDNN's default convolution kernels may sum in a different order from one call to the next,
    so the same recipe gave different numbers run after run (measured on an H200: recovered losses
    1.14747 / 1.14748 from identical settings); with these two flags, bitwise the same. CPU runs are
    unaffected.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        cudnn = torch.backends.cudnn
        saved = cudnn.deterministic, cudnn.benchmark
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            return fn(*args, **kwargs)
        finally:
            cudnn.deterministic, cudnn.benchmark = saved

    return wrapper


def default_out_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{name}-{stamp}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage: %s", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _as_config(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike[str], overrides: list[str]
) -> tuple[RunConfig, Path | None]:
    if isinstance(config, RunConfig):
        strategy = config.strategy or ("auto" if config.auto() else "manual")
        config = config.model_dump(mode="json") | {"strategy": strategy}
    if isinstance(config, Mapping):
        return validate(apply_overrides(settle_strategy(dict(config)), overrides)), None
    return load_config(config, overrides)


def _with_found_files(cfg: RunConfig, search: list[Path]) -> RunConfig:
    """Files the recipe names relative to its folder, made absolute: the saved config.yaml reruns from anywhere.

    Only the keys that change are replaced, so the keys a recipe set stay exactly those it set (strategy auto
    is decided from them)."""

    def found(name: str | None) -> str | None:
        path = find_file(name, search) if name else None
        return str(path.resolve()) if path is not None and path.is_file() else name

    for section, key in (("model", "checkpoint"), ("prune", "allocation_file"), ("recover", "rewind_checkpoint")):
        part = getattr(cfg, section)
        old = getattr(part, key)
        new = found(old)
        if new != old:
            cfg = cfg.model_copy(update={section: part.model_copy(update={key: new})})
    return cfg


def _config_text(cfg: RunConfig, search: list[Path]) -> str:
    folders = ", ".join(json.dumps(str(f)) for f in [Path.cwd(), *search])
    return (
        "# The resolved config of this run: rerun it with `regrow run config.yaml`. Factories were imported from\n"
        f"# {folders}; run it again where they still import.\n" + cfg.to_yaml()
    )


def _check_inputs_outside(cfg: RunConfig, out: Path) -> None:
    """Refuse an output folder where a finished run would replace one of the files the run reads."""
    inputs = {
        "model.checkpoint": cfg.model.checkpoint,
        "prune.allocation_file": cfg.prune.allocation_file,
        "recover.rewind_checkpoint": cfg.recover.rewind_checkpoint,
    }
    for key, name in inputs.items():
        if name is None:
            continue
        path = Path(name)
        if path.name in RUN_FILES and path.parent.resolve() == out.resolve():
            raise RegrowError(
                f"{key} {name!r} is in the output folder {str(out)!r}, and a finished run writes its own "
                f"{path.name} there, replacing the file it was given. Choose another --out, or move the file."
            )


def _recover_kwargs(cfg: RunConfig, search: list[Path]) -> dict[str, Any]:
    """recover() keyword arguments from the recipe: factories resolved, files found next to the recipe."""
    opts = cfg.recover.model_dump()
    opts["share"] = {"k": opts["share"]["k"]}  # share.after / share.epochs are the run's, not recover()'s
    opts["augment"] = build_augment(opts.pop("augment"), search)
    checkpoint = opts.pop("rewind_checkpoint")
    if checkpoint is not None:
        path = find_file(checkpoint, search)
        if not path.is_file():
            raise RegrowError(f"recover.rewind_checkpoint {checkpoint!r} does not exist.")
        opts["rewind_state"] = path
    if opts["original"] is None and cfg.model.train is not None:
        # The baseline is trained here, so the original schedule is known exactly (see TrainConfig).
        t = cfg.model.train
        opts["original"] = {"lr": t.lr, "epochs": t.epochs, "schedule": "cosine", "warmup": BASELINE_WARMUP}
    return opts


BASELINE_WARMUP = 0.05  # warm-up share of the baseline training regrow runs (model.train)


def _count_classes(data: Any) -> int:
    """Number of classes in a labelled dataset: one more than the largest label."""
    return 1 + max(int(unpack(batch)[1].max()) for batch in data)


def _merge_shared(result: RecoveryResult, shared: RecoveryResult, info: dict[str, Any], offset: int) -> RecoveryResult:
    """The main recovery's result and report section ``info``, with the weight-sharing post-step's outcome
    attached: the model handed back is the post-step's, so its kept epoch (numbered after the ``offset``
    epochs of the main recovery) and its validation accuracy are the run's."""
    result.shared = shared.shared
    result.details["sharing"] = shared.details.get("sharing")
    n = shared.epochs_run
    result.stop_reason += f"; then {n} epoch{'' if n == 1 else 's'} of weight sharing ({shared.stop_reason})"
    info["sharing"] = result.details["sharing"]
    info["stop_reason"] = result.stop_reason
    info["phases"] = {"recovery": info["epochs_run"], "sharing": n}
    info["epochs_run"] = info["epochs_run"] + n
    info["steps"] = info["steps"] + shared.steps
    info["seconds"] = info["seconds"] + shared.seconds
    info["best_epoch"] = offset + shared.best_epoch
    info["best_val_accuracy"] = shared.best_val_accuracy
    if shared.best_epoch == 0:  # the history's row at ``offset`` shows the weights before they were clustered
        info["best_note"] = "the shared values right after clustering, before their fine-tuning"
    return result


class _Snapshot:
    """Baseline-training callback that keeps the weights at one step (the weight-rewinding point)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state: dict[str, torch.Tensor] | None = None

    def _take(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_start(self, state: Any) -> None:
        if self.step == 0:
            self._take(state.model)

    def on_step_end(self, state: Any) -> None:
        if state.step == self.step:
            self._take(state.model)

    def checkpoint_ready(self, state: Any) -> bool:
        return True


def _check_schedule(cfg: RunConfig, spec: PruneSpec, structural: bool) -> None:
    name = cfg.schedule.name
    if name == "one_shot":
        return
    if spec.threshold is not None:
        raise RegrowError(
            f"schedule {name!r} raises the sparsity step by step and needs prune.sparsity, not prune.threshold."
        )
    if name == "gradual" and structural:
        raise RegrowError(
            f"schedule 'gradual' raises a mask's sparsity between steps; pattern {spec.pattern!r} shrinks the model, "
            "so use schedule 'iterative' (shrink a little, recover, repeat) or 'one_shot'."
        )
    if not structural and spec.pattern != "unstructured":
        raise RegrowError(
            f"schedule {name!r} works with pattern 'unstructured'; pattern {spec.pattern!r} fixes its "
            "sparsity, use schedule 'one_shot'."
        )
    if cfg.recover.epochs < 1:
        raise RegrowError(f"schedule {name!r} prunes during recovery and needs recover.epochs >= 1.")
    if name == "iterative" and cfg.recover.epochs < cfg.schedule.rounds:
        raise RegrowError(
            f"schedule 'iterative' with {cfg.schedule.rounds} rounds needs at least one recovery epoch per "
            f"round; recover.epochs is {cfg.recover.epochs}."
        )


def _validate_request(cfg: RunConfig, model: nn.Module) -> tuple[PruneSpec, bool]:
    """The pruning request checked against the model (no tracing, no training): spec and whether structural."""
    p = cfg.prune
    pattern = p.resolved_pattern
    structural = get_pattern(pattern).structural
    if structural:
        validate_request(model, pattern, p.targets, p.ignore)
        spec = PruneSpec(pattern, p.criterion, p.scope, p.sparsity, None, [], macs=p.macs, params=p.params)
    else:
        spec = plan(
            model,
            p.sparsity,
            threshold=p.threshold,
            pattern=pattern,
            criterion=p.criterion,
            scope="layer" if p.allocation == "uniform" else p.scope,
            targets=p.targets,
            ignore=p.ignore,
        )
    _check_schedule(cfg, spec, structural)
    return spec, structural


def _check_augment(augment: Any, data: Any) -> None:
    """Apply an augmentation to one batch now, so a mismatch with the inputs fails before any training."""
    if augment is None:
        return
    inputs, _ = unpack(next(iter(data)))
    augment(inputs)


def _check_combinations(cfg: RunConfig, spec: PruneSpec, structural: bool) -> None:
    """Settings that are each valid but do not work together: refused before anything is trained."""
    p, r = cfg.prune, cfg.recover
    pattern = spec.pattern
    if r.method in ("rigl", "set") and pattern != "unstructured":
        raise RegrowError(
            f"recover.method {r.method!r} drops and regrows single weights anywhere in a tensor, so it needs "
            f"pattern 'unstructured'; pattern {pattern!r} would be broken or left unchanged. Use method "
            "'distill' or 'finetune'."
        )
    if r.rewind == "weights" and structural:
        raise RegrowError(
            f"recover.rewind 'weights' resets weights to a snapshot of the original shapes; pattern {pattern!r} "
            "shrinks the model, so only rewind 'lr' applies."
        )
    if r.rewind != "none" and "lr_schedule" in r.model_fields_set and r.lr_schedule != "cosine":
        raise RegrowError(
            f"recover.rewind {r.rewind!r} replays the original training's learning-rate schedule, so "
            f"recover.lr_schedule {r.lr_schedule!r} would be ignored: give one of the two."
        )
    if p.criterion == "bn_scale" and pattern != "channel":
        raise RegrowError(
            f"criterion 'bn_scale' scores whole channels by their BatchNorm scale; it needs pattern 'channel', "
            f"not {pattern!r}. Allowed criteria here: magnitude, random, taylor."
        )
    if cfg.schedule.name == "gradual" and spec.sparsity is not None and cfg.schedule.initial >= spec.sparsity:
        raise RegrowError(
            f"schedule.initial ({cfg.schedule.initial:g}) must be below the target sparsity ({spec.sparsity:g}): "
            "the gradual ramp rises from initial to the target."
        )
    if p.clamps and p.allocation not in ("uniform", "sensitivity", "search"):
        raise RegrowError(
            "prune.clamps bound the per-target sparsities that an allocation plans; give prune.allocation "
            "(uniform, sensitivity or search) too, or leave clamps out."
        )
    if p.latency is not None and cfg.schedule.name == "iterative":
        raise RegrowError(
            "a latency budget is met in one shot (it is measured, not planned round by round): use schedule "
            "'one_shot', or give a macs budget for iterative rounds."
        )
    new_task = cfg.model.train is not None and cfg.model.train.data is not None
    if r.method == "transfer" or new_task:
        what = "method 'transfer'" if r.method == "transfer" else "a run with model.train.data (a new task)"
        if r.distill:
            raise RegrowError(
                f"recover.distill: true does not apply to {what}: the source model's logits are for other "
                "classes; method 'transfer' distills its features instead (recover.feature_weight)."
            )
        if r.stop_when is not None and r.stop_when.within is not None:
            raise RegrowError(
                f"recover.stop_when.within compares with the baseline's accuracy on the same task; {what} has no "
                "dense baseline on the new task to compare with. Use stop_when.seconds or recover.epochs."
            )
        if r.rewind == "weights":
            raise RegrowError(
                "recover.rewind 'weights' resets the model to a snapshot of the source model, whose head is for "
                f"the source classes; {what} gives it a new head. Use rewind 'lr' or 'none'."
            )
    if r.method == "share" and cfg.schedule.name == "gradual":
        raise RegrowError(
            "recover.method 'share' clusters the surviving weights once, at the start of recovery; schedule "
            "'gradual' prunes more of them during recovery, and the clusters would bring them back. Use schedule "
            "'one_shot' or 'iterative' with 'share', or recover with another method and set recover.share.after: true."
        )
    if r.stop_when is not None and r.stop_when.within is not None and cfg.model.train is None:
        if cfg.model.checkpoint is None and cfg.model.name is not None:
            raise RegrowError(
                f"recover.stop_when.within compares with the baseline's accuracy, but the built-in model "
                f"{cfg.model.name!r} is neither trained here (model.train) nor loaded (model.checkpoint): its "
                "baseline is an untrained network. Train or load it, or use stop_when.seconds or recover.epochs."
            )
    ignored = [  # (key, when it would be ignored, what it applies to)
        ("recover.max_lr", r.max_lr is not None and r.lr_schedule != "one_cycle", "lr_schedule 'one_cycle'"),
        (
            "recover.rewind_checkpoint",
            r.rewind_checkpoint is not None and r.rewind != "weights",
            "rewind 'weights'",
        ),
        # compared with the defaults, not with the keys given: a saved config.yaml states every key
        (
            "recover.dynamic",
            r.dynamic != type(r.dynamic)() and r.method not in ("rigl", "set"),
            "method 'rigl' or 'set'",
        ),
        (
            "recover.share",
            r.share.model_copy(update={"after": False}) != type(r.share)()
            and r.method != "share"
            and not r.share.after,
            "method 'share' or share.after: true",
        ),
    ]
    for key, unused, use in ignored:
        if unused:
            raise RegrowError(
                f"{key} is given but applies only to {use}, which this recipe does not use, so it would be "
                f"ignored. Remove {key}, or use {use}."
            )
    if r.rewind != "none" and r.rewind_epoch is not None:
        # the same original schedule _recover_kwargs hands to recover(): stated, else the baseline's, else assumed
        if r.original is not None:
            original_epochs, where = float(r.original.epochs), "recover.original.epochs"
        elif cfg.model.train is not None:
            original_epochs, where = float(cfg.model.train.epochs), "model.train.epochs"
        else:
            original_epochs = default_original(r.lr, r.epochs).epochs
            where = "the assumed original schedule (twice recover.epochs)"
        if r.rewind_epoch >= original_epochs:
            raise RegrowError(
                f"recover.rewind_epoch {r.rewind_epoch:g} is not inside the original training ({original_epochs:g} "
                f"epochs, from {where}); give a rewind point from 0 to below {original_epochs:g}."
            )
    if p.allocation_file:
        from regrow.allocation import Allocation

        allocation = Allocation.load(p.allocation_file)
        if allocation.pattern != pattern:
            raise RegrowError(
                f"allocation file {p.allocation_file!r} was made for pattern {allocation.pattern!r}, not {pattern!r}."
            )
        if not structural and set(allocation.per_target) != set(spec.targets):
            unknown = sorted(set(allocation.per_target) - set(spec.targets))
            missing = sorted(set(spec.targets) - set(allocation.per_target))
            raise RegrowError(
                f"allocation file {p.allocation_file!r} does not plan this model's targets (unknown: "
                f"{unknown[:5] or 'none'}; missing: {missing[:5] or 'none'}); the targets are: "
                f"{', '.join(spec.targets[:10])}."
            )


def _check_group_allocation(cfg: RunConfig, model: nn.Module, data: Any) -> None:
    """A structural allocation file names channel / head groups: check them on a copy of the model now, before
    any training (the groups depend on the architecture only, not on the weights)."""
    from regrow.allocation import Allocation
    from regrow.structural import prepare

    p = cfg.prune
    allocation = Allocation.load(p.allocation_file)  # type: ignore[arg-type]
    with _Unshuffled(data) as unshuffled:
        prepared = prepare(
            copy.deepcopy(model), pattern=p.resolved_pattern, targets=p.targets, ignore=p.ignore, data=unshuffled
        )
    unknown = sorted(set(allocation.per_target) - {u.name for u in prepared.units})
    if unknown:
        raise RegrowError(
            f"allocation file {p.allocation_file!r} names groups this model does not have: {unknown[:5]}; its "
            f"groups are: {', '.join(u.name for u in prepared.active)}."
        )


def _given_keys(cfg: RunConfig) -> dict[str, Any]:
    """The recipe keys of prune / schedule / recover the user stated, with their values."""
    given = {}
    for section in ("prune", "schedule", "recover"):
        if section not in cfg.model_fields_set:
            continue
        part = getattr(cfg, section)
        for key in part.model_fields_set:
            given[f"{section}.{key}"] = getattr(part, key)
    return given


def _apply_settings(cfg: RunConfig, settings: dict[str, Any]) -> RunConfig:
    return validate(apply_overrides(cfg.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in settings.items()]))


class _Unshuffled:
    """Iterate a loader without spending its shuffling randomness: its generator's state is put back after,
    so measuring before training (strategy auto, timing a step) never changes the order training sees."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.generator = getattr(loader, "generator", None)

    def __enter__(self) -> Any:
        self.state = self.generator.get_state() if self.generator is not None else None
        return self.loader

    def __exit__(self, *exc: Any) -> None:
        if self.state is not None:
            self.generator.set_state(self.state)


def _auto_strategy(cfg: RunConfig, model: nn.Module, train: Any, teacher: bool, device: str) -> Any:
    from regrow.strategy import Facts, decide
    from regrow.structural.graph import find_attention

    layers = {"conv": 0, "linear": 0, "attention": 0, "norm": 0}
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            layers["conv"] += 1
        elif isinstance(m, nn.Linear):
            layers["linear"] += 1
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            layers["norm"] += 1
        if isinstance(m, nn.MultiheadAttention):
            layers["attention"] += 1
    layers["attention"] += len(find_attention(model))
    with _Unshuffled(train) as loader:
        inputs, _ = unpack(next(iter(loader)))
        samples = (
            len(loader.dataset)
            if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__")
            else sum(unpack(b)[1].shape[0] for b in loader)
        )
    sample = to_device(inputs, torch.device(device))
    step_seconds = _time_one_step(model, train, device)
    p = cfg.prune
    budget = {
        k: v
        for k, v in (("sparsity", p.sparsity), ("macs", p.macs), ("params", p.params), ("latency", p.latency))
        if v is not None
    }
    facts = Facts(
        params=count_params(model)[0],
        macs=dense_macs(
            model, sample[:1] if isinstance(sample, torch.Tensor) else {k: v[:1] for k, v in sample.items()}
        ),
        layers=layers,
        train_samples=int(samples),
        image_inputs=isinstance(sample, torch.Tensor) and sample.dim() == 4,
        image_side=min(sample.shape[-2:]) if isinstance(sample, torch.Tensor) and sample.dim() == 4 else None,
        budget=budget or {"sparsity": 0.0},
        teacher=teacher,
        seconds=cfg.recover.stop_when.seconds if cfg.recover.stop_when else None,
        step_seconds=step_seconds,
        steps_per_epoch=len(train) if hasattr(train, "__len__") else None,
    )
    return decide(facts, _given_keys(cfg), default_epochs=cfg.recover.epochs)


def _time_one_step(model: nn.Module, train: Any, device: str) -> float:
    """Seconds for one forward + backward on a training batch (on a copy; nothing changes)."""
    trial = copy.deepcopy(model).train()
    with _Unshuffled(train) as loader:
        inputs, targets = unpack(next(iter(loader)))
    inputs, targets = to_device(inputs, torch.device(device)), to_device(targets, torch.device(device))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(forward(trial, inputs), targets).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def _sensitivity(cfg: RunConfig, model: nn.Module, spec: PruneSpec, val: Any, progress: bool) -> Any:
    from regrow.measure.sensitivity import sensitivity

    p = cfg.prune
    return sensitivity(
        model,
        val,
        pattern=spec.pattern,
        levels=cfg.sensitivity.levels,
        criterion=p.criterion,
        targets=p.targets,
        ignore=p.ignore,
        batches=cfg.sensitivity.batches,
        progress=progress,
    )


def _train_baseline(
    cfg: RunConfig,
    model: nn.Module,
    train: Any,
    val: Any,
    search: list[Path],
    progress: bool,
    callbacks: Sequence[Any] = (),
) -> None:
    """Train the model as the recipe's model.train says (AdamW, cosine with warm-up, no early stopping)."""
    t = cfg.model.train
    assert t is not None
    recover(
        model,
        MaskSet({}),
        train,
        val,
        method="finetune",
        epochs=t.epochs,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup=BASELINE_WARMUP,
        patience=None,
        augment=build_augment(t.augment, search),
        callbacks=callbacks,
        progress=progress,
    )


def _wants_sensitivity(cfg: RunConfig, model: nn.Module, spec: PruneSpec) -> bool:
    enabled = cfg.sensitivity.enabled
    if enabled is not None:
        return enabled
    if cfg.prune.allocation in ("sensitivity", "search"):
        return True
    # Cheap enough to explain every run: few targets and a small model.
    layers = sum(1 for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)))
    return (
        layers * len(cfg.sensitivity.levels) <= 120
        and count_params(model)[0] <= 5_000_000
        and not spec.pattern[0].isdigit()
    )


def _plan_allocation(
    cfg: RunConfig,
    model: nn.Module,
    spec: PruneSpec,
    structural: bool,
    train: Any,
    val: Any,
    out: Path,
    timer: _Timer,
    progress: bool,
    device: str,
) -> tuple[Any, Any]:
    """Sensitivity curves (when wanted) and the per-target allocation (when asked for); both saved."""
    from regrow.allocation import Allocation, allocate, clamps_from
    from regrow.measure.sensitivity import calibration_batches

    p = cfg.prune
    sens = None
    if _wants_sensitivity(cfg, model, spec):
        with timer.stage("sensitivity"):
            sens = _sensitivity(cfg, model, spec, val, progress)
            sens.save(out / "sensitivity.json")
            sens.plot(out / "sensitivity.png")
    if p.allocation_file:
        allocation = Allocation.load(p.allocation_file)  # checked against the request by _check_combinations
    elif p.allocation in ("uniform", "sensitivity", "search"):
        assert sens is not None or p.allocation == "uniform"
        if sens is None:
            sens = _sensitivity(cfg, model, spec, val, progress)
        budget = next(
            (k, v)
            for k, v in (("sparsity", p.sparsity), ("macs", p.macs), ("params", p.params), ("latency", p.latency))
            if v is not None
        )
        kind, value = ("macs", budget[1]) if budget[0] == "latency" else budget  # latency is planned by MACs
        calib = calibration_batches(val, cfg.sensitivity.batches, torch.device(device))

        def score(candidate: dict[str, float]) -> float:
            trial = copy.deepcopy(model)
            try:
                if structural:
                    prune(
                        trial,
                        pattern=spec.pattern,
                        criterion=p.criterion,
                        targets=p.targets,
                        ignore=p.ignore,
                        data=train,
                        keep_dense=False,
                        round_to=p.round_to,
                        max_sparsity=p.cap,
                        allocation=candidate,
                        **{budget[0]: budget[1]},
                    )
                else:
                    trial_spec = PruneSpec(
                        spec.pattern,
                        spec.criterion,
                        "layer",
                        spec.sparsity,
                        None,
                        spec.targets,
                        allocation=candidate,
                        cap=p.cap,
                    )
                    MaskSet(compute_masks(trial, trial_spec, train), spec=trial_spec).apply(trial)
            except RegrowError:
                return float("inf")
            return classification_metrics(trial, calib)["loss"]

        with timer.stage("allocation"):
            allocation = allocate(
                p.allocation,
                sens,
                kind,
                value,
                score=score,
                candidates=p.search_candidates,
                min_sparsity=p.min_sparsity,
                max_sparsity=p.cap,
                clamps=clamps_from(p.clamps, [c.name for c in sens.curves]),
                seed=cfg.seed,
            )
    else:
        return sens, None
    allocation.save(out / "allocation.json")
    return sens, allocation


def _overall_structure(reports: list[dict[str, Any]], budget: dict[str, float]) -> dict[str, Any] | None:
    """One structure report for the whole run: the last round's model against the original one.

    Rounds of an iterative schedule each report against the model they started from; this folds them
    together (units per group from the first round's count to the last round's, MACs and parameters
    against the original, every equivalence check)."""
    if len(reports) <= 1:
        return reports[0] if reports else None
    first, last = reports[0], reports[-1]
    before = {g["name"]: g for g in first["groups"]}
    groups = [
        g | {k: before.get(g["name"], g)[k] for k in ("units_before", "channels_before") if k in g}
        for g in last["groups"]
    ]
    checks = [r["equivalence"] for r in reports]
    worst = max(checks, key=lambda e: e["max_abs_diff"] / max(e["tolerance"], 1e-30))
    return last | {
        "budget": budget,
        "macs_before": first["macs_before"],
        "params_before": first["params_before"],
        "macs_ratio": last["macs_after"] / first["macs_before"] if first["macs_before"] else 1.0,
        "params_ratio": last["params_after"] / first["params_before"] if first["params_before"] else 1.0,
        "units_total": first["units_total"],
        "units_removed": sum(r["units_removed"] for r in reports),
        "groups": groups,
        "evaluations": sum(r["evaluations"] for r in reports),
        "equivalence": worst | {"passed": all(e["passed"] for e in checks)},
        "warnings": list(dict.fromkeys(w for r in reports for w in r["warnings"])),
        "rounds": len(reports),
    }


def _costliest(sens: Any, pruned: Snapshot, structure: dict[str, Any] | None) -> list[list[Any]] | None:
    """The targets / groups whose pruning costs most at the sparsity they got (from the sensitivity curves);
    only those whose pruning alone raised the calibration loss."""
    if sens is None:
        return None
    if structure:
        levels = {
            g["name"]: 1 - g["units_after"] / g["units_before"]
            for g in structure["groups"]
            if g["excluded"] is None and g["units_before"]
        }
    else:
        levels = dict(pruned.per_target_sparsity)
    return [[name, rise, levels[name]] for name, rise in sens.costliest(levels, k=3) if rise > 0] or None


class _Pruner:
    """One pruning step of a run, masked or structural: to the final budget, or to round r of k.

    Round r of k leaves the model at the share ``r / k`` of the way to the final budget, geometrically:
    density ``(1 - s) ** (r / k)`` for a sparsity ``s``, MACs or parameters ``m ** (r / k)`` of the
    original for a budget ``m`` (each round is measured against the original, so errors do not add up).
    """

    def __init__(
        self,
        cfg: RunConfig,
        spec: PruneSpec,
        structural: bool,
        data: Any,
        sample: Any,
        allocation: dict[str, float] | None = None,
    ) -> None:
        self.cfg, self.spec, self.structural, self.data = cfg, spec, structural, data
        self.allocation = allocation
        self.sample = sample  # one input, to measure MACs between rounds
        self.original: dict[str, float] = {}
        self.reports: list[dict[str, Any]] = []

    def remember(self, model: nn.Module) -> None:
        self.original = {"macs": float(dense_macs(model, self.sample) or 0), "params": float(count_params(model)[0])}

    def final_budget(self) -> dict[str, float]:
        p = self.cfg.prune
        budgets = (("sparsity", p.sparsity), ("macs", p.macs), ("params", p.params), ("latency", p.latency))
        return {k: v for k, v in budgets if v is not None}

    def _structural_budget(self, model: nn.Module, round_index: int, rounds: int) -> dict[str, float]:
        p = self.cfg.prune
        if rounds == 1:
            return self.final_budget()
        share = round_index / rounds
        if p.macs is not None:
            now = dense_macs(model, self.sample) or 1
            return {"macs": min(1.0, p.macs**share * self.original["macs"] / now)}
        if p.params is not None:
            return {"params": min(1.0, p.params**share * self.original["params"] / count_params(model)[0])}
        return {"sparsity": 1.0 - (1.0 - (p.sparsity or 0.0)) ** (1.0 / rounds)}

    def step(self, model: nn.Module, previous: MaskSet | None = None, round_index: int = 1, rounds: int = 1) -> MaskSet:
        p = self.cfg.prune
        if self.structural:
            masks = structural_masks(
                model,
                pattern=self.spec.pattern,
                allocation=self.allocation,
                criterion=p.criterion,
                scope=p.scope,
                targets=p.targets,
                ignore=p.ignore,
                data=self.data,
                round_to=p.round_to,
                max_sparsity=p.cap,
                # later rounds round the groups that were wide before the first one
                round_widths={g["name"]: g["channels_before"] for g in self.reports[0]["groups"]}
                if self.reports
                else None,
                **self._structural_budget(model, round_index, rounds),
            )
            assert masks.structure is not None
            self.reports.append(masks.structure.to_dict())
            return masks
        spec = self.spec
        if rounds > 1:
            spec = spec.with_sparsity(iterative(round_index, final=spec.sparsity or 0.0, rounds=rounds))
        masks = MaskSet(compute_masks(model, spec, self.data, previous=previous), spec=spec)
        masks.apply(model)
        return masks


def _history_dicts(result: RecoveryResult, offset: int = 0, round_index: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for h in result.to_dict()["history"]:
        if offset and h["epoch"] == 0:
            continue  # epoch 0 of a later round repeats the state after the previous round's pruning
        h = dict(h, epoch=h["epoch"] + offset)
        if round_index is not None:
            h["round"] = round_index
        rows.append(h)
    return rows


@reproducible_kernels
def run(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike[str],
    *,
    overrides: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RunReport:
    """Run the whole pipeline from a typed config, a dict, or a recipe path / built-in recipe name.

    Writes into ``out_dir`` (default ``runs/<name>-<timestamp>``; a non-empty folder is refused unless
    ``overwrite``): ``config.yaml``, ``report.json``, ``report.md``, ``curve.png``,
    ``model.safetensors`` (masks squashed in), ``masks.safetensors`` and ``arch.json``, and when they
    apply ``sensitivity.json`` / ``.png``, ``allocation.json`` and ``shared.safetensors`` (README, "What a
    run writes"). The files appear there only when the run succeeds; a run that fails leaves the folder as it
    was. ``overrides`` are ``"key.sub=value"`` strings, as with ``regrow run --set``; ``progress`` shows
    progress bars (on a terminal only).
    """
    cfg, recipe_path = _as_config(config, overrides or [])
    search = search_path(recipe_path)
    cfg = _with_found_files(cfg, search)
    device = device_of(cfg.device)
    if out_dir:  # fail before any work if the folder would be refused
        prepare_out_dir(out_dir, overwrite=overwrite, create=False)
        _check_inputs_outside(cfg, Path(out_dir))
    timer = _Timer()
    seed_everything(cfg.seed)

    with timer.stage("load"):
        bundle = build_data(cfg.data, search)
        train, val, test = bundle.train, bundle.val, bundle.test
        if val is None:
            train, val = split_validation(train, cfg.data.val_fraction, cfg.seed)
        model = build_model(cfg.model, search).to(device)
        # Validate the pruning request against the real model before spending time on training.
        spec, structural = _validate_request(cfg, model)
        _check_combinations(cfg, spec, structural)
        if structural and cfg.prune.allocation_file:
            _check_group_allocation(cfg, model, val)
        recover_kwargs = _recover_kwargs(cfg, search)
        if cfg.recover.rewind == "weights" and "rewind_state" in recover_kwargs:  # read and checked now, not later
            recover_kwargs["rewind_state"] = read_rewind_state(recover_kwargs["rewind_state"], model)
        for split, data in (("train", train), ("validation", val), ("test", test)):
            with _Unshuffled(data) as unshuffled:  # checking draws no shuffling randomness
                # a model trained on another task (model.train.data) gets a new head for these labels
                check_batch(
                    model, unshuffled, split, label_range=cfg.model.train is None or cfg.model.train.data is None
                )
        _check_augment(recover_kwargs.get("augment"), val)  # val: iterating it draws no shuffling randomness
        if cfg.model.train is not None:
            _check_augment(build_augment(cfg.model.train.augment, search), val)
        source = None
        if cfg.model.train is not None and cfg.model.train.data is not None:
            if cfg.recover.method == "distill":
                raise RegrowError(
                    "with model.train.data the model is transferred to a new task with a new head, so the "
                    "source model's logits cannot teach it: use recover.method 'transfer' (feature "
                    "distillation) or 'finetune'."
                )
            source = build_data(cfg.model.train.data, search)
            if source.val is None:
                source.train, source.val = split_validation(source.train, cfg.model.train.data.val_fraction, cfg.seed)
            for split, data in (("source training", source.train), ("source validation", source.val)):
                with _Unshuffled(data) as unshuffled:
                    check_batch(model, unshuffled, split)
        if cfg.recover.rewind == "weights" and "rewind_state" not in recover_kwargs and cfg.model.train is None:
            raise RegrowError(
                "recover.rewind 'weights' needs the weights at the rewind point: give recover.rewind_checkpoint "
                "(a safetensors file), or let regrow train the baseline (model.train) and keep them itself."
            )
    # Everything the user gave has been checked; only now is anything written, and into a staging folder:
    # the files replace those of an earlier run only once this run has succeeded.
    final = Path(out_dir) if out_dir else default_out_dir(cfg.name)
    with staged_out_dir(final, overwrite=overwrite) as out:
        atomic_write_text(out / "config.yaml", _config_text(cfg, search))

        notes: list[str] = []
        extra: dict[str, Any] = {}
        rewind_snapshot = None
        if cfg.model.train is not None:
            seed_everything(cfg.seed + 1)
            with timer.stage("train_baseline"):
                t = cfg.model.train
                base_train, base_val = (source.train, source.val) if source is not None else (train, val)
                callbacks = []
                if cfg.recover.rewind == "weights" and "rewind_state" not in recover_kwargs:
                    # Renda et al.: rewind to the point as far from the end of training as recovery is long.
                    epoch, _ = rewind_plan(
                        OriginalSchedule(t.lr, t.epochs), cfg.recover.epochs, cfg.recover.rewind_epoch
                    )
                    rewind_snapshot = _Snapshot(round(epoch * len(base_train)))
                    callbacks.append(rewind_snapshot)
                    recover_kwargs["rewind_epoch"] = epoch
                _train_baseline(cfg, model, base_train, base_val, search, progress, callbacks)
                if rewind_snapshot is not None:
                    recover_kwargs["rewind_state"] = rewind_snapshot.state

        ev = cfg.evaluate

        def snapshot(m: nn.Module, stage: str, masks: MaskSet | None = None) -> Snapshot:
            with timer.stage(f"evaluate_{stage}"):
                return evaluate(
                    m,
                    test,
                    targets=spec.targets,
                    stage=stage,
                    latency=ev.latency,
                    latency_batch_size=ev.latency_batch_size,
                    repeats=ev.repeats,
                    warmup=ev.warmup,
                    progress=progress,
                )

        if source is not None:
            # Transfer: the dense source model teaches features; the baseline to match is the dense model
            # transferred to the target task with the same recovery budget.
            with timer.stage("transfer_reference"):
                extra["source_test_accuracy"] = classification_metrics(model, source.test)["accuracy"]
                teacher = frozen_copy(model)
                classes = bundle.num_classes or _count_classes(train)
                head = new_head(model, classes)
                reference = copy.deepcopy(model)
                seed_everything(cfg.seed + 4)
                opts = {k: v for k, v in recover_kwargs.items() if k not in ("method", "rewind", "rewind_state")}
                recover(reference, MaskSet({}), train, val, method="finetune", progress=progress, **opts)
            snapshots = {"baseline": snapshot(reference, "baseline")}
            del reference
            notes.append(
                f"Transfer: the model was trained on {source.description or 'the source data'} (test accuracy "
                f"{100 * extra['source_test_accuracy']:.2f}%), then given a new {classes}-class head `{head}`. The "
                "baseline is the dense model fine-tuned on the target task with the same budget; the pruned stage "
                "has the new, untrained head."
            )
        else:
            snapshots = {"baseline": snapshot(model, "baseline")}
            teacher = frozen_copy(model)

        strategy = None
        if cfg.auto():
            with timer.stage("strategy"):
                strategy = _auto_strategy(cfg, model, train, teacher is not None, device)
                cfg = _apply_settings(cfg, strategy.settings())
                spec, structural = _validate_request(cfg, model)
                _check_combinations(cfg, spec, structural)  # what the strategy chose, with what the recipe stated
                keep = {k: recover_kwargs[k] for k in ("rewind_state", "rewind_epoch") if k in recover_kwargs}
                recover_kwargs = _recover_kwargs(cfg, search) | keep
                atomic_write_text(out / "config.yaml", _config_text(cfg, search))  # the config as decided
            for decision in strategy.decisions:
                log.info("strategy: %s", decision.line())
        sens, allocation = _plan_allocation(cfg, model, spec, structural, train, val, out, timer, progress, device)
        if allocation is not None and not structural:
            spec = PruneSpec(
                spec.pattern,
                spec.criterion,
                spec.scope,
                spec.sparsity,
                spec.threshold,
                spec.targets,
                allocation=allocation.per_target,
                cap=cfg.prune.cap,
            )
        schedule = cfg.schedule

        pruner = _Pruner(
            cfg,
            spec,
            structural,
            train,
            to_device(sample_inputs(test, 1), torch.device(device)),
            allocation=allocation.per_target if allocation is not None and structural else None,
        )
        pruner.remember(model)
        if not get_pattern(spec.pattern).can_speed_up_dense:
            log.warning(speed_warning(spec.pattern))
        seed_everything(cfg.seed + 2)
        if schedule.name == "one_shot":
            with timer.stage("prune"):
                masks = pruner.step(model)
            snapshots["pruned"] = snapshot(model, "pruned")
            seed_everything(cfg.seed + 3)
            with timer.stage("recover"):
                result = recover(model, masks, train, val, teacher=teacher, progress=progress, **recover_kwargs)
            history = _history_dicts(result)
            recovery_info: dict[str, Any] = result.to_dict()
        else:
            # For reference, the pruned stage is the baseline pruned one-shot to the final budget.
            with timer.stage("prune"):
                reference = copy.deepcopy(model)
                _Pruner(cfg, spec, structural, train, pruner.sample, pruner.allocation).step(reference)
            snapshots["pruned"] = snapshot(reference, "pruned")
            del reference
            notes.append(
                f"Schedule '{schedule.name}' prunes during recovery; the 'pruned' stage shows the baseline pruned "
                "one-shot to the final budget, to show what pruning alone costs."
            )
            seed_everything(cfg.seed + 3)
            with timer.stage("recover"):
                if schedule.name == "iterative":
                    masks, result, history, recovery_info = _iterative(
                        model, pruner, cfg, train, val, teacher, recover_kwargs, progress
                    )
                else:
                    masks = MaskSet(
                        {f: torch.ones_like(model.get_parameter(f), dtype=torch.bool) for f in spec.targets},
                        spec=spec.with_sparsity(0.0),
                    )
                    gradual = GradualPruning(
                        final=spec.sparsity or 0.0,
                        every=schedule.every,
                        begin=schedule.begin,
                        end=schedule.end,
                        initial=schedule.initial,
                        spec=spec,
                    )
                    result = recover(
                        model,
                        masks,
                        train,
                        val,
                        teacher=teacher,
                        progress=progress,
                        callbacks=[gradual],
                        **recover_kwargs,
                    )
                    history = _history_dicts(result)
                    recovery_info = result.to_dict()
        if cfg.recover.share.after and cfg.recover.method != "share":
            seed_everything(cfg.seed + 5)
            with timer.stage("share"):
                opts = {
                    k: v for k, v in recover_kwargs.items() if k not in ("method", "epochs", "rewind", "rewind_state")
                }
                shared_result = recover(
                    model,
                    masks,
                    train,
                    val,
                    method="share",
                    epochs=cfg.recover.share.epochs,
                    teacher=teacher,
                    progress=progress,
                    **opts,
                )
            offset = history[-1]["epoch"] if history else 0
            history += _history_dicts(shared_result, offset)
            result = _merge_shared(result, shared_result, recovery_info, offset)
        recovery_info["history"] = history
        snapshots["recovered"] = snapshot(model, "recovered")
        speed = None
        if ev.latency and teacher is not None:
            with timer.stage("compare_latency"):
                batch = sample_inputs(test, ev.latency_batch_size)
                dense_cpu, pruned_cpu = copy.deepcopy(teacher).cpu(), copy.deepcopy(model).cpu()
                before, after = compare_latency(
                    dense_cpu,
                    pruned_cpu,
                    to_device(batch, torch.device("cpu")),
                    rounds=max(ev.repeats, 30),  # a ratio needs enough pairs to be steady
                    warmup=ev.warmup,
                )
                speed = {
                    "baseline": before.to_dict(),
                    "recovered": after.to_dict(),
                    "speedup": before.median_ms / after.median_ms,
                }
                del dense_cpu, pruned_cpu

        with timer.stage("export"):
            export = _export(
                model,
                masks,
                spec,
                cfg,
                out,
                test,
                search,
                snapshots["recovered"],
                classes if source is not None else None,
            )
            if result.shared is not None:
                result.shared.save(out / "shared.safetensors")
                export["shared"] = "shared.safetensors"
            if history:
                export["curve_plot"] = plot_curve(history, out / "curve.png", title=f"{cfg.name}: recovery").name

        pattern = get_pattern(spec.pattern)
        structure = _overall_structure(pruner.reports, pruner.final_budget())
        prune_info = spec.to_dict() | {
            "speed_note": pattern.speed_note,
            "excluded_classifier": final_classifier(teacher)
            if cfg.prune.targets is None and teacher is not None
            else None,
            "structure": structure,
            "structure_rounds": pruner.reports if len(pruner.reports) > 1 else None,
            "speed": speed,
            "strategy": strategy.to_dict() if strategy is not None else None,
            "sensitivity": sens.to_dict() if sens is not None else None,
            "allocation": allocation.to_dict() if allocation is not None else None,
            "costliest": _costliest(sens, snapshots["pruned"], structure),
        }
        recovery_info.update({k: v for k, v in extra.items()})
        report = RunReport(
            name=cfg.name,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            config=cfg.model_dump(mode="json"),
            environment=environment(device) | {"data": getattr(bundle, "description", "")},
            prune=prune_info,
            snapshots=snapshots,
            recovery=recovery_info,
            timings=timer.timings,
            export=export,
            notes=notes,
            out_dir=str(final),
        )
        report.write(out)
    return report


def _iterative(
    model: nn.Module,
    pruner: _Pruner,
    cfg: RunConfig,
    train: Any,
    val: Any,
    teacher: nn.Module | None,
    recover_kwargs: dict[str, Any],
    progress: bool,
) -> tuple[MaskSet, RecoveryResult, list[dict[str, Any]], dict[str, Any]]:
    """k rounds of prune -> recover; the epoch budget is split evenly over the rounds."""
    rounds = cfg.schedule.rounds
    kwargs = dict(recover_kwargs)
    total = kwargs.pop("epochs")
    per_round = [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]
    masks: MaskSet | None = None
    history: list[dict[str, Any]] = []
    rounds_info = []
    offset = 0
    result: RecoveryResult | None = None
    for r in range(1, rounds + 1):
        masks = pruner.step(model, previous=masks, round_index=r, rounds=rounds)
        macs_now = dense_macs(model, pruner.sample) or 0
        macs_share = macs_now / pruner.original["macs"] if pruner.original["macs"] else None
        log.info(
            "iterative round %d/%d: target sparsity %.4f, MACs %s of the original, %d epochs",
            r,
            rounds,
            masks.sparsity(),
            "n/a" if macs_share is None else f"{macs_share:.4f}",
            per_round[r - 1],
        )
        result = recover(
            model, masks, train, val, teacher=teacher, progress=progress, epochs=per_round[r - 1], **kwargs
        )
        history += _history_dicts(result, offset, r)
        offset += result.epochs_run
        rounds_info.append(
            {
                "round": r,
                "sparsity": masks.sparsity() if masks.masks else None,
                "macs_of_original": macs_share,
                "params_of_original": count_params(model)[0] / pruner.original["params"],
                "epochs": per_round[r - 1],
                "best_epoch": result.best_epoch,
                "best_val_accuracy": result.best_val_accuracy,
                "stop_reason": result.stop_reason,
            }
        )
    assert masks is not None and result is not None
    info = result.to_dict() | {"rounds": rounds_info, "epochs_run": offset}
    return masks, result, history, info


def _export(
    model: nn.Module,
    masks: MaskSet,
    spec: PruneSpec,
    cfg: RunConfig,
    out: Path,
    test: Any,
    search: list[Path],
    recovered: Snapshot,
    new_classes: int | None,
) -> dict[str, Any]:
    """Save weights and arch.json (regrow.save), masks if any, then reload with regrow.load and re-check."""
    meta = {"regrow.targets": json.dumps(spec.targets), "regrow.pattern": spec.pattern}
    save(model, out, overwrite=True, metadata=meta)
    files = {"model": "model.safetensors", "arch": "arch.json", "config": "config.yaml"}
    if masks.masks:
        masks.save(out / "masks.safetensors")
        files["masks"] = "masks.safetensors"

    def factory() -> nn.Module:
        fresh = build_model(cfg.model, search, load_checkpoint=False)
        if new_classes is not None:  # transfer: the saved model has the target task's head
            new_head(fresh, new_classes)
        return fresh

    fresh = load(out, factory)
    fresh.to(next(model.parameters()).device)
    reloaded = classification_metrics(fresh, test)["accuracy"]
    if reloaded != recovered.accuracy:
        log.warning("reloaded accuracy %.6f differs from recovered accuracy %.6f", reloaded, recovered.accuracy)
    return files | {"reload_check": {"accuracy": reloaded, "matches": reloaded == recovered.accuracy}}


@reproducible_kernels
def run_sensitivity(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike[str],
    *,
    overrides: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """Only the sensitivity analysis of a recipe (baseline trained first if the recipe says so).

    With ``model.train.data`` (a transfer recipe) the model is trained and measured on that source data,
    where its classifier applies. Writes ``sensitivity.json``, ``sensitivity.png`` and ``sensitivity.md``
    into ``out_dir``.
    """

    cfg, recipe_path = _as_config(config, overrides or [])
    search = search_path(recipe_path)
    cfg = _with_found_files(cfg, search)
    device = device_of(cfg.device)
    if out_dir:
        prepare_out_dir(out_dir, overwrite=overwrite, create=False)
    seed_everything(cfg.seed)
    bundle = build_data(cfg.data, search)
    train, val = bundle.train, bundle.val
    if val is None:
        train, val = split_validation(train, cfg.data.val_fraction, cfg.seed)
    model = build_model(cfg.model, search).to(device)
    spec, _ = _validate_request(cfg, model)
    if cfg.model.train is not None and cfg.model.train.data is not None:
        # A transfer recipe: the model is trained on the source task and its head only fits that task, so
        # it is measured there (a run measures it again on the target task after giving it a new head).
        source = build_data(cfg.model.train.data, search)
        train, val = source.train, source.val
        if val is None:
            train, val = split_validation(train, cfg.model.train.data.val_fraction, cfg.seed)
    final = Path(out_dir) if out_dir else default_out_dir(f"{cfg.name}-sensitivity")
    with staged_out_dir(final, overwrite=overwrite) as out:
        if cfg.model.train is not None:
            seed_everything(cfg.seed + 1)
            _train_baseline(cfg, model, train, val, search, progress)
        result = _sensitivity(cfg, model, spec, val, progress)
        result.save(out / "sensitivity.json")
        result.plot(out / "sensitivity.png")
        atomic_write_text(
            out / "sensitivity.md",
            f"# Sensitivity: {cfg.name}\n\n" + result.markdown() + "\n\n![sensitivity](sensitivity.png)\n",
        )
    result.out_dir = str(final)  # type: ignore[attr-defined]
    return result
