"""The :class:`RunReport` dataclass: everything one run measured, and how it is written to disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regrow.io import atomic_write_text
from regrow.measure import Snapshot
from regrow.report.markdown import render_markdown


@dataclass
class RunReport:
    """The result of :func:`regrow.run`."""

    name: str
    created: str
    config: dict[str, Any]
    environment: dict[str, Any]
    prune: dict[str, Any]
    snapshots: dict[str, Snapshot]
    recovery: dict[str, Any]
    timings: dict[str, float]
    export: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    out_dir: str | None = None

    # Derived figures -------------------------------------------------------------------------
    def accuracy(self, stage: str) -> float:
        return self.snapshots[stage].accuracy

    @property
    def drop(self) -> float:
        """Accuracy lost by pruning (baseline - pruned), as a fraction."""
        return self.accuracy("baseline") - self.accuracy("pruned")

    @property
    def recovered_fraction(self) -> float | None:
        """Share of the pruning drop won back by recovery; None when pruning cost nothing."""
        if self.drop <= 0:
            return None
        return (self.accuracy("recovered") - self.accuracy("pruned")) / self.drop

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "summary": {
                "baseline_accuracy": self.accuracy("baseline"),
                "pruned_accuracy": self.accuracy("pruned"),
                "recovered_accuracy": self.accuracy("recovered"),
                "drop": self.drop,
                "recovered_fraction": self.recovered_fraction,
                # None for channel / head removal: the model is smaller, not sparse
                "target_sparsity": None if self.prune.get("structure") else self.snapshots["recovered"].target_sparsity,
            },
            "config": self.config,
            "environment": self.environment,
            "prune": self.prune,
            "snapshots": {k: v.to_dict() for k, v in self.snapshots.items()},
            "recovery": self.recovery,
            "timings": self.timings,
            "export": self.export,
            "notes": self.notes,
        }

    def write(self, out_dir: str | os.PathLike[str]) -> None:
        """Write report.json and report.md (atomically)."""
        out = Path(out_dir)
        atomic_write_text(out / "report.json", json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        atomic_write_text(out / "report.md", render_markdown(self))


__all__ = ["RunReport"]
