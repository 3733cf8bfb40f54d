"""Which timm attention classes pattern 'head' takes: the timm sweep's models (benchmarks.sweep), prepared for
head pruning on this machine.

    python -m benchmarks.heads --out benchmarks/results/heads

The models and input sizes are those of ``benchmarks/results/sweep/timm.json`` (one model of each timm
architecture module), built as the sweep builds them (random weights, seed 0, batch norms holding their own
activations' statistics). Each runs ``regrow.structural.prepare(model, pattern="head", example_inputs=...)`` in
its own process with a time limit: the attention modules regrow finds, by the class they had in timm (a stand-in
counts as its original), and whether each one's heads can go (its group probed and not left out) or why not. A
class is taken when its heads can go in at least one block of one model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import torchvision_models
from benchmarks.common import markdown_table, stamp, stamp_markdown
from benchmarks.sweep import _cell, _random_classifier, _timm_model, live_norms

SWEEP = Path("benchmarks/results/sweep/timm.json")


def one(name: str, size: int, copy: Path) -> dict[str, Any]:
    """Prepare one model for pattern 'head'; its attention modules, each with its class and None (its heads can
    go) or the reason they cannot."""
    from regrow.errors import RegrowError  # noqa: PLC0415
    from regrow.structural import prepare  # noqa: PLC0415
    from regrow.structural.graph import find_attention  # noqa: PLC0415

    torch.manual_seed(0)
    model, _ = _timm_model(name, copy)
    model = live_norms(_random_classifier(model.eval()), size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    try:
        units = {u.name: u.group.excluded for u in prepare(model, pattern="head", example_inputs=x).units}
    except RegrowError as exc:  # none can go: "no group can be pruned with pattern 'head' (name: why; ...)"
        listed = str(exc).partition(" (")[2].removesuffix(").")
        units = {"": str(exc), **dict(p.partition(": ")[::2] for p in listed.split("; ") if ": " in p)}
    found = find_attention(model)
    return {
        "model": name,
        "attention": {n: [_timm_class(m), units.get(n, units.get("", "not probed"))] for n, m in sorted(found.items())},
    }


def _timm_class(module: torch.nn.Module) -> str:
    cls = getattr(module, "_original", None) or type(module)  # a stand-in (regrow.structural.timm_attention)
    return f"{cls.__module__}.{cls.__qualname__}".removeprefix("timm.")


def _run(name: str, size: int, copy: Path, limit: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.heads", "--one", name, "--size", str(size)]
    try:
        done = subprocess.run(
            [*command, "--torchvision-models", str(copy)], capture_output=True, text=True, timeout=limit, check=False
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"no result within {limit} s"}
    try:
        return json.loads(done.stdout.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {"model": name, "error": last[0][:300]}


def _write(out: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    classes: dict[str, list[str]] = defaultdict(list)  # class -> "model: why" of each block that cannot go
    taken: set[str] = set()
    for row in rows:
        for name, (cls, why) in row.get("attention", {}).items():
            if why is None:
                taken.add(cls)
            else:
                classes[cls].append(f"{row['model']} {name}: {why}")
            classes.setdefault(cls, [])
    out.mkdir(parents=True, exist_ok=True)
    (out / "heads.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    table = [[cls, "yes" if cls in taken else "**no**", _cell(classes[cls][0][:300]) if cls not in taken else ""]
             for cls in sorted(classes)]  # fmt: skip
    failed = [r["model"] for r in rows if "error" in r]
    text = [
        "# Which timm attention classes pattern 'head' takes",
        "",
        stamp_markdown(info),
        "",
        f"{len(taken)} of the {len(classes)} attention classes in the timm sweep's {len(rows)} models lose heads in "
        "at least one block (pattern 'head', the sweep's input sizes)."
        + (f" Failed to prepare: {', '.join(failed)}." if failed else ""),
        "",
        markdown_table(["class", "heads go", "why not (its first block)"], table),
        "",
    ]
    (out / "heads.md").write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heads"))
    parser.add_argument("--limit", type=int, default=600, help="seconds per model")
    parser.add_argument("--torchvision-models", type=Path, default=torchvision_models.DEFAULT)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, its row as JSON
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.torchvision_models)))
        return
    info = stamp()
    rows = []
    for row in json.loads(SWEEP.read_text())["rows"]:
        if "error" not in row:
            rows.append(_run(row["model"], int(row["size"]), args.torchvision_models, args.limit))
            print(json.dumps(rows[-1])[:300], flush=True)
            _write(args.out, rows, info)


if __name__ == "__main__":
    main()
