"""Stage 5, prune: masks or a shrunk model, to the final budget at once or round by round."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import regrow.distributed as distributed
from regrow.batches import to_device
from regrow.config import RunConfig
from regrow.masks import MaskSet
from regrow.measure import sample_inputs
from regrow.measure.cost import count_params, dense_macs
from regrow.patterns import get_pattern
from regrow.pipeline.context import Timer, seed_everything
from regrow.pipeline.load import Loaded
from regrow.pipeline.measure import Snapshots
from regrow.pipeline.plan import Plan
from regrow.prune import compute_masks, speed_warning, structural_masks
from regrow.schedules import iterative
from regrow.spec import PruneSpec

log = logging.getLogger("regrow")


@dataclass
class Pruned:
    """The pruner (it prunes again in later rounds of a schedule), the masks of a one-shot prune (None when
    the schedule prunes during recovery), and notes for the report."""

    pruner: Pruner
    masks: MaskSet | None
    notes: list[str] = field(default_factory=list)


def prune_model(loaded: Loaded, decided: Plan, snapshots: Snapshots, timer: Timer) -> Pruned:
    """One shot: prune the model now. A schedule that prunes during recovery: prune a copy one-shot to the
    final budget, only for the 'pruned' snapshot (what pruning alone costs)."""
    cfg, spec, model = decided.cfg, decided.spec, loaded.model
    allocation = decided.allocation.per_target if decided.allocation is not None and decided.structural else None
    sample = to_device(sample_inputs(loaded.test, 1), torch.device(loaded.device))
    pruner = Pruner(cfg, spec, decided.structural, loaded.train, sample, allocation=allocation)
    pruner.remember(model)
    if not get_pattern(spec.pattern).can_speed_up_dense:
        log.info(speed_warning(spec.pattern))  # the report says so too; a choice, not a fault
    seed_everything(cfg.seed + 2)
    if cfg.schedule.name == "one_shot":
        with timer.stage("prune"):
            masks = pruner.step(model)
        snapshots.take(model, "pruned", spec.targets)
        return Pruned(pruner, masks)
    with timer.stage("prune"):
        reference = copy.deepcopy(model)
        Pruner(cfg, spec, decided.structural, loaded.train, pruner.sample, pruner.allocation).step(reference)
    snapshots.take(reference, "pruned", spec.targets)
    del reference
    note = (
        f"Schedule '{cfg.schedule.name}' prunes during recovery; the 'pruned' stage shows the baseline pruned "
        "one-shot to the final budget, to show what pruning alone costs."
    )
    return Pruned(pruner, None, [note])


class Pruner:
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
                within=p.within,
                # later rounds round the groups that were wide before the first one
                round_widths={g["name"]: g["channels_before"] for g in self.reports[0]["groups"]}
                if self.reports
                else None,
                **self._structural_budget(model, round_index, rounds),
            )
            assert masks.structure is not None
            self.reports.append(masks.structure.to_dict())
            distributed.broadcast_model(model)  # several processes: every rank goes on from rank 0's model
            return masks
        spec = self.spec
        if rounds > 1:
            spec = spec.with_sparsity(iterative(round_index, final=spec.sparsity or 0.0, rounds=rounds))
        masks = MaskSet(compute_masks(model, spec, self.data, previous=previous), spec=spec)
        masks.apply(model)
        distributed.broadcast_model(model, masks.masks)
        return masks
