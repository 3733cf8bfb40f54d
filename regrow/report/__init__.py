"""RunReport: everything one run measured, as JSON (``report.json``) and Markdown (``report.md``)."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from regrow.io import atomic_write_text
from regrow.measure import Snapshot

STAGES = ("baseline", "pruned", "recovered")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_version() -> str:
    from regrow import __version__

    return f"{__version__} (source, not installed)"


def environment(device: str = "cpu") -> dict[str, Any]:
    """Library versions and the machine, for reproducibility."""

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    env = {
        "regrow": version("regrow") or _source_version(),  # a source checkout on PYTHONPATH has no metadata
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "numpy": version("numpy"),
        "safetensors": version("safetensors"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


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
        from regrow.report.markdown import render_markdown

        out = Path(out_dir)
        atomic_write_text(out / "report.json", json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        atomic_write_text(out / "report.md", render_markdown(self))


__all__ = ["RunReport", "STAGES", "environment", "cpu_model"]
