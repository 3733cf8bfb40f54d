"""Shared helpers for the benchmark scripts: result stamps (command, versions, machine) and tables."""

from __future__ import annotations

import csv
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from regrow.report import environment

RESULTS = Path(__file__).parent / "results"


def stamp() -> dict[str, Any]:
    env = environment("cpu")
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "regrow": env["regrow"],
        "python": env["python"],
        "cpu": env["cpu"],
        "cpu_count": env["cpu_count"],
        "threads": torch.get_num_threads(),
    }


def stamp_markdown(info: dict[str, Any]) -> str:
    return (
        f"Command: `{info['command']}`  \n"
        f"Measured {info['date']} on {info['cpu']} ({info['cpu_count']} cores, {info['threads']} torch threads), "
        f"torch {info['torch']}, regrow {info['regrow']}, Python {info['python']}."
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list[Any]], info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write("".join(f"# {k}: {v}\n" for k, v in info.items()))
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
