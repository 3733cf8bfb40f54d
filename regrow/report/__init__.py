"""RunReport: everything one run measured, as JSON (``report.json``) and Markdown (``report.md``)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import torch

from regrow._version import __version__
from regrow.report.run_report import RunReport

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


__all__ = ["RunReport", "STAGES", "environment", "cpu_model"]
