"""Stage 4, plan: strategy auto's choices, the sensitivity curves and the per-target allocation."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import regrow.distributed as distributed
from regrow.batches import forward, to_device, unpack
from regrow.config import RunConfig, apply_overrides, validate
from regrow.errors import RegrowError
from regrow.io import atomic_write_text
from regrow.masks import MaskSet
from regrow.measure.cost import count_params, dense_macs
from regrow.measure.metrics import classification_metrics
from regrow.pipeline.check import Checked, check_allocation_file, check_request, recover_options
from regrow.pipeline.context import Timer, Unshuffled
from regrow.pipeline.load import Loaded, config_text
from regrow.prune import compute_masks, prune
from regrow.spec import PruneSpec
from regrow.tasks import task_loss

log = logging.getLogger("regrow")


@dataclass
class Plan:
    """The run as decided: the config (strategy auto's choices applied), the request and recover()'s options
    that follow from it, the strategy's decisions, the sensitivity curves and the allocation (each None when
    the run has none)."""

    cfg: RunConfig
    spec: PruneSpec
    structural: bool
    recover_kwargs: dict[str, Any]
    strategy: Any = None
    sens: Any = None
    allocation: Any = None


def make_plan(loaded: Loaded, checked: Checked, has_teacher: bool, out: Path, timer: Timer, progress: bool) -> Plan:
    """Strategy auto (when it applies), then sensitivity and allocation; the allocation goes into the spec."""
    decided = Plan(loaded.cfg, checked.spec, checked.structural, checked.recover_kwargs)
    if loaded.cfg.auto():
        with timer.stage("strategy"):
            decided = choose_strategy(loaded, checked, has_teacher, out)
        for decision in decided.strategy.decisions:
            log.info("strategy: %s", decision.line())
    cfg, spec = decided.cfg, decided.spec
    decided.sens, decided.allocation = plan_allocation(decided, loaded, out, timer, progress)
    if decided.allocation is not None and not decided.structural:
        decided.spec = dataclasses.replace(spec, allocation=decided.allocation.per_target, cap=cfg.prune.cap)
    return decided


def choose_strategy(loaded: Loaded, checked: Checked, has_teacher: bool, out: Path) -> Plan:
    """Strategy auto: decide from measured facts, apply the settings, check them with what the recipe stated
    (before anything else is written) and save the config as decided."""
    strategy = auto_strategy(loaded.cfg, loaded.model, loaded.train, has_teacher, loaded.device)
    cfg = apply_settings(loaded.cfg, strategy.settings())  # the rules of regrow.checks, on what was chosen
    spec, structural = check_request(cfg, loaded.model)
    check_allocation_file(cfg, spec, structural)
    kept = checked.recover_kwargs
    keep = {k: kept[k] for k in ("rewind_state", "rewind_epoch") if k in kept}
    recover_kwargs = recover_options(cfg, loaded.search) | keep
    atomic_write_text(out / "config.yaml", config_text(cfg, loaded.search))  # the config as decided
    return Plan(cfg, spec, structural, recover_kwargs, strategy)


def given_keys(cfg: RunConfig) -> dict[str, Any]:
    """The recipe keys of prune / schedule / recover the user stated, with their values."""
    given = {}
    for section in ("prune", "schedule", "recover"):
        if section not in cfg.model_fields_set:
            continue
        part = getattr(cfg, section)
        for key in part.model_fields_set:
            given[f"{section}.{key}"] = getattr(part, key)
    return given


def apply_settings(cfg: RunConfig, settings: dict[str, Any]) -> RunConfig:
    """The config with ``settings`` ({"section.key": value}) applied and validated again."""
    return validate(apply_overrides(cfg.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in settings.items()]))


def count_layers(model: nn.Module) -> dict[str, int]:
    """Convolutions, linear layers, attention blocks and norms: facts the strategy decides from."""
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
    return layers


def auto_strategy(cfg: RunConfig, model: nn.Module, train: Any, teacher: bool, device: str) -> Any:
    """Measure the facts strategy auto needs (model, data, one step's time) and let it decide."""
    from regrow.strategy import Facts, decide

    train = distributed.whole(train)  # several processes: every rank measures all of it, rank 0's decision holds
    layers = count_layers(model)
    with Unshuffled(train) as loader:
        inputs, _ = unpack(next(iter(loader)))
        samples = (
            len(loader.dataset)
            if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__")
            else sum(unpack(b)[1].shape[0] for b in loader)
        )
    sample = to_device(inputs, torch.device(device))
    step_seconds = time_one_step(model, train, device)
    p = cfg.prune
    budget = {
        k: v
        for k, v in (("sparsity", p.sparsity), ("macs", p.macs), ("params", p.params), ("latency", p.latency))
        if v is not None
    }
    image = isinstance(sample, torch.Tensor) and sample.dim() == 4
    facts = Facts(
        params=count_params(model)[0],
        macs=dense_macs(
            model, sample[:1] if isinstance(sample, torch.Tensor) else {k: v[:1] for k, v in sample.items()}
        ),
        layers=layers,
        train_samples=int(samples),
        image_inputs=image,
        image_side=min(sample.shape[-2:]) if image else None,
        budget=budget or {"sparsity": 0.0},
        teacher=teacher,
        seconds=cfg.recover.stop_when.seconds if cfg.recover.stop_when else None,
        step_seconds=step_seconds,
        steps_per_epoch=len(train) if hasattr(train, "__len__") else None,
    )
    return distributed.broadcast_object(decide(facts, given_keys(cfg), default_epochs=cfg.recover.epochs))


def time_one_step(model: nn.Module, train: Any, device: str) -> float:
    """Seconds for one forward + backward on a training batch (on a copy; nothing changes)."""
    trial = copy.deepcopy(model).train()
    with Unshuffled(train) as loader:
        inputs, targets = unpack(next(iter(loader)))
    inputs, targets = to_device(inputs, torch.device(device)), to_device(targets, torch.device(device))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        task_loss(forward(trial, inputs), targets).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def sensitivity(cfg: RunConfig, model: nn.Module, spec: PruneSpec, val: Any, progress: bool) -> Any:
    """The sensitivity curves of the recipe's targets on the validation split."""
    from regrow.measure.sensitivity import sensitivity as measure

    p = cfg.prune
    return measure(
        model,
        distributed.whole(val),  # several processes: every rank measures on all of it (the same curves)
        pattern=spec.pattern,
        levels=cfg.sensitivity.levels,
        criterion=p.criterion,
        targets=p.targets,
        ignore=p.ignore,
        batches=cfg.sensitivity.batches,
        progress=progress,
    )


def wants_sensitivity(cfg: RunConfig, model: nn.Module, spec: PruneSpec) -> bool:
    """As the recipe says; by default when an allocation needs the curves or they are cheap to measure."""
    enabled = cfg.sensitivity.enabled
    if enabled is not None:
        return enabled
    if cfg.prune.allocation in ("sensitivity", "search"):
        return True
    if cfg.recover.objective.kind != "labels":  # the curves are measured on labels (a rule refuses asking for them)
        return False
    # Cheap enough to explain every run: few targets and a small model.
    layers = sum(1 for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)))
    return (
        layers * len(cfg.sensitivity.levels) <= 120
        and count_params(model)[0] <= 5_000_000
        and not spec.pattern[0].isdigit()
    )


def plan_allocation(decided: Plan, loaded: Loaded, out: Path, timer: Timer, progress: bool) -> tuple[Any, Any]:
    """Sensitivity curves (when wanted) and the per-target allocation (when asked for); both saved."""
    from regrow.allocation import Allocation, allocate, clamps_from
    from regrow.measure.sensitivity import calibration_batches

    cfg, model, spec, val = decided.cfg, loaded.model, decided.spec, loaded.val
    p = cfg.prune
    sens = None
    if wants_sensitivity(cfg, model, spec):
        with timer.stage("sensitivity"):
            sens = sensitivity(cfg, model, spec, val, progress)
            sens.save(out / "sensitivity.json")
            sens.plot(out / "sensitivity.png")
    if p.allocation_file:
        allocation = Allocation.load(p.allocation_file)  # checked against the request by the check stage
    elif p.allocation in ("uniform", "sensitivity", "search"):
        if sens is None:
            sens = sensitivity(cfg, model, spec, val, progress)
        budget = next(
            (k, v)
            for k, v in (("sparsity", p.sparsity), ("macs", p.macs), ("params", p.params), ("latency", p.latency))
            if v is not None
        )
        kind, value = ("macs", budget[1]) if budget[0] == "latency" else budget  # latency is planned by MACs
        calib = calibration_batches(distributed.whole(val), cfg.sensitivity.batches, torch.device(loaded.device))
        score = AllocationScore(decided, model, loaded.train, budget, calib)
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


class AllocationScore:
    """An allocation search's score of one candidate: its calibration loss once applied to a copy of the
    model (structural groups shrunk, or masks applied), infinite when the candidate cannot be applied."""

    def __init__(self, decided: Plan, model: nn.Module, train: Any, budget: tuple[str, float], calib: Any) -> None:
        self.decided, self.model, self.train, self.budget, self.calib = decided, model, train, budget, calib

    def __call__(self, candidate: dict[str, float]) -> float:
        spec, p = self.decided.spec, self.decided.cfg.prune
        trial = copy.deepcopy(self.model)
        try:
            if self.decided.structural:
                prune(
                    trial,
                    pattern=spec.pattern,
                    criterion=p.criterion,
                    targets=p.targets,
                    ignore=p.ignore,
                    data=self.train,
                    keep_dense=False,
                    round_to=p.round_to,
                    max_sparsity=p.cap,
                    allocation=candidate,
                    within=p.within,
                    **{self.budget[0]: self.budget[1]},
                )
            else:
                trial_spec = dataclasses.replace(
                    spec,
                    scope="row" if spec.scope == "row" else "layer",
                    threshold=None,
                    allocation=candidate,
                    cap=p.cap,
                )
                MaskSet(compute_masks(trial, trial_spec, self.train), spec=trial_spec).apply(trial)
        except RegrowError:
            return float("inf")
        return classification_metrics(trial, self.calib)["loss"]
