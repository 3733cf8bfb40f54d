"""Measuring a run: a snapshot at each stage, the dense-vs-pruned latency pair, the structure in one report."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from regrow.batches import to_device
from regrow.config import EvaluateConfig
from regrow.measure import Snapshot, evaluate, sample_inputs
from regrow.measure.latency import compare_latency
from regrow.pipeline.context import Timer


class Snapshots:
    """Takes the snapshot of one stage on the test split, timed as ``evaluate_<stage>``, and keeps it."""

    def __init__(self, test: Any, ev: EvaluateConfig, timer: Timer, progress: bool) -> None:
        self.test, self.ev, self.timer, self.progress = test, ev, timer, progress
        self.taken: dict[str, Snapshot] = {}

    def take(self, model: nn.Module, stage: str, targets: list[str]) -> Snapshot:
        with self.timer.stage(f"evaluate_{stage}"):
            self.taken[stage] = evaluate(
                model,
                self.test,
                targets=targets,
                stage=stage,
                latency=self.ev.latency,
                latency_batch_size=self.ev.latency_batch_size,
                repeats=self.ev.repeats,
                warmup=self.ev.warmup,
                progress=self.progress,
            )
        return self.taken[stage]


def compare_speed(
    teacher: nn.Module | None, model: nn.Module, test: Any, ev: EvaluateConfig, timer: Timer
) -> dict[str, Any] | None:
    """The dense and the recovered model timed in interleaved pairs on the CPU: their latencies and speed-up
    (None when latency is off or there is no dense copy to time)."""
    if not ev.latency or teacher is None:
        return None
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
    return {"baseline": before.to_dict(), "recovered": after.to_dict(), "speedup": before.median_ms / after.median_ms}


def overall_structure(reports: list[dict[str, Any]], budget: dict[str, float]) -> dict[str, Any] | None:
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


def costliest(sens: Any, pruned: Snapshot, structure: dict[str, Any] | None) -> list[list[Any]] | None:
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
