"""Measuring a run: a snapshot at each stage, the dense-vs-pruned latency pair, the structure in one report."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from regrow.batches import model_device, to_device
from regrow.config import EvaluateConfig
from regrow.measure import Snapshot, evaluate, sample_inputs
from regrow.measure.latency import compare_latency, pair_noise
from regrow.objectives import Objective
from regrow.pipeline.context import Timer

log = logging.getLogger("regrow")


class Snapshots:
    """Takes the snapshot of one stage on the test split, timed as ``evaluate_<stage>``, and keeps it."""

    def __init__(
        self, test: Any, ev: EvaluateConfig, timer: Timer, progress: bool, objective: Objective | None = None
    ) -> None:
        self.test, self.ev, self.timer, self.progress = test, ev, timer, progress
        self.taken: dict[str, Snapshot] = {}
        self.objective = objective  # None: labels; an Embedding is measured against ``reference``
        self.reference: nn.Module | None = None  # the dense model (the baseline is its own reference)

    def bound(self, model: nn.Module) -> Objective | None:
        """The objective measuring ``model``: an Embedding compares with the dense reference (set after the
        baseline) or, before it, with ``model`` itself."""
        if self.objective is None:
            return None
        return self.objective.bind(self.reference if self.reference is not None else model)

    def take(self, model: nn.Module, stage: str, targets: list[str]) -> Snapshot:
        with self.timer.stage(f"evaluate_{stage}"):
            self.taken[stage] = evaluate(
                model,
                self.test,
                objective=self.bound(model),
                targets=targets,
                stage=stage,
                latency=self.ev.latency,
                latency_batch_size=self.ev.latency_batch_size,
                repeats=self.ev.repeats,
                warmup=self.ev.warmup,
                progress=self.progress,
            )
        return self.taken[stage]


SLOWER = 0.95  # a shrunk model under this speed-up at some batch size is reported as slower, with the numbers


def compare_speed(
    teacher: nn.Module | None,
    model: nn.Module,
    test: Any,
    ev: EvaluateConfig,
    device: str,
    shrunk: bool,
    timer: Timer,
) -> dict[str, Any] | None:
    """The dense and the recovered model timed in interleaved pairs on the run's device (synchronised on a GPU),
    at the latency batch size and at batch 1: latencies and speed-ups (None when latency is off or there is no
    dense copy to time). A comparison whose timings are noisy (``pair_noise``: a busy machine) says why, and the
    report makes no speed-up claim from it. A ``shrunk`` model slower than dense at some batch size, in timings
    that are not noisy, gets a warning with the numbers: a small batch is bound by per-layer overheads, a large
    one by arithmetic, and the two can disagree. A masked model (not ``shrunk``) keeps dense shapes: its ratio
    is reported as a timing ratio, never as a speed-up."""
    if not ev.latency or teacher is None:
        return None
    where = torch.device(device)
    with timer.stage("compare_latency"):
        dense, pruned = (m if model_device(m) == where else copy.deepcopy(m).to(where) for m in (teacher, model))
        batch = sample_inputs(test, ev.latency_batch_size)
        rows = [_timed_pair(dense, pruned, batch, ev, where)]
        if rows[0]["batch_size"] != 1:
            rows.append(_timed_pair(dense, pruned, sample_inputs(test, 1), ev, where))
    first = rows[0]
    speed = {k: first[k] for k in ("baseline", "recovered", "speedup", "noisy")}
    speed |= {"device": str(where), "batches": rows, "shrunk": shrunk}
    for row in rows:
        if row["noisy"]:
            log.warning("latency at batch %d was too noisy for a speed-up claim: %s", row["batch_size"], row["noisy"])
    slower = [r for r in rows if r["speedup"] < SLOWER and not r["noisy"]] if shrunk else []
    speed["slower"] = [
        f"the shrunk model is slower than the dense one at batch {r['batch_size']} on {where}: {r['speedup']:.2f}x "
        f"({r['baseline']['median_ms']:.3f} ms dense, {r['recovered']['median_ms']:.3f} ms shrunk, median of "
        f"{r['baseline']['repeats']} interleaved pairs)"
        for r in slower
    ]
    for line in speed["slower"]:
        log.warning(line)
    return speed


def _timed_pair(
    dense: nn.Module, pruned: nn.Module, inputs: Any, ev: EvaluateConfig, where: torch.device
) -> dict[str, Any]:
    """One interleaved timing of the two models on ``inputs``: their latencies and the speed-up."""
    before, after = compare_latency(
        dense,
        pruned,
        to_device(inputs, where),
        rounds=max(ev.repeats, 30),  # a ratio needs enough pairs to be steady
        warmup=ev.warmup,
    )
    return {
        "batch_size": before.batch_size,
        "baseline": before.to_dict(),
        "recovered": after.to_dict(),
        "speedup": before.median_ms / after.median_ms,
        "noisy": pair_noise(before, after),  # why no speed-up may be claimed from these timings, or None
    }


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
