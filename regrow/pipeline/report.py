"""Stage 9, report: everything the run measured and decided, as one RunReport (report.json, report.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from regrow.patterns import get_pattern
from regrow.pipeline.baseline import Baseline
from regrow.pipeline.context import Timer
from regrow.pipeline.load import Loaded
from regrow.pipeline.measure import Snapshots, costliest, overall_structure
from regrow.pipeline.plan import Plan
from regrow.pipeline.prune import Pruned
from regrow.pipeline.recover import Recovered
from regrow.report import RunReport, environment
from regrow.select import final_classifier


def prune_section(
    decided: Plan,
    pruned: Pruned,
    base: Baseline,
    snapshots: Snapshots,
    speed: dict[str, Any] | None,
    acceleration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's prune section: the request, the structure reached, the speed measured, what was planned."""
    spec, sens, strategy, allocation = decided.spec, decided.sens, decided.strategy, decided.allocation
    reports = pruned.pruner.reports
    structure = overall_structure(reports, pruned.pruner.final_budget())
    teacher = base.teacher
    return spec.to_dict() | {
        "speed_note": get_pattern(spec.pattern).speed_note,
        "excluded_classifier": final_classifier(teacher)
        if decided.cfg.prune.targets is None and teacher is not None
        else None,
        "structure": structure,
        "structure_rounds": reports if len(reports) > 1 else None,
        "speed": speed,
        "acceleration": acceleration,
        "strategy": strategy.to_dict() if strategy is not None else None,
        "sensitivity": sens.to_dict() if sens is not None else None,
        "allocation": allocation.to_dict() if allocation is not None else None,
        "costliest": costliest(sens, snapshots.taken["pruned"], structure),
    }


def build_report(
    loaded: Loaded,
    decided: Plan,
    base: Baseline,
    pruned: Pruned,
    recovered: Recovered,
    snapshots: Snapshots,
    speed: dict[str, Any] | None,
    acceleration: dict[str, Any] | None,
    files: dict[str, Any],
    timer: Timer,
    final: Path,
) -> RunReport:
    """The run's report, addressed to the folder it is published in (``final``)."""
    prune_info = prune_section(decided, pruned, base, snapshots, speed, acceleration)
    recovered.info.update(base.extra)
    return RunReport(
        name=decided.cfg.name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=decided.cfg.model_dump(mode="json"),
        environment=environment(loaded.device) | {"data": getattr(loaded.bundle, "description", "")},
        prune=prune_info,
        snapshots=snapshots.taken,
        recovery=recovered.info,
        timings=timer.timings,
        export=files,
        notes=base.notes + pruned.notes,
        out_dir=str(final),
    )
