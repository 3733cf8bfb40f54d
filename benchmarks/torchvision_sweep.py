"""Every classification model of ``torchvision.models``, pruned by channel to half its MACs, on this machine.

    python -m benchmarks.torchvision_sweep --out benchmarks/results/torchvision_sweep
    python -m benchmarks.torchvision_sweep --models resnet18 swin_t --out /tmp/sweep  # a few

Random initial weights (seed 0; a classifier that starts at zero gets random ones, as in benchmarks.zoo), 10
classes, ``regrow.prune(model, pattern="channel", macs=0.5, example_inputs=torch.randn(2, 3, S, S))`` with S = 64
px for convolutional networks, 96 for Inception-v3 (its smallest input) and 224 for the transformers (ViT, Swin,
MaxViT fix their input size). Each model runs in its own process with a time limit, so that one that hangs or
runs out of memory is reported and the others still run. Per model: MACs kept, whether the equivalence check
passed, groups left out for a reason that is not benign, seconds to prune (tracing included), or the failure's
first line. Where torchvision does not import (a CPU-only torch) the unpacked copy ``make install`` puts in
``.venv/torchvision-models`` is used (benchmarks.torchvision_models).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import torchvision_models
from benchmarks.common import markdown_table, stamp, stamp_markdown
from benchmarks.zoo import _random_classifier

BUDGET, TOLERANCE = 0.5, 0.02
BENIGN = ("not a target", "its channels are the model's output", "inside attention")


def _models(copy: Path) -> Any:
    try:
        import torchvision.models as models  # noqa: PLC0415 - where torchvision imports, use it

        return models
    except Exception:  # noqa: BLE001 - a CUDA build beside the CPU torch fails in several ways
        torchvision_models.drop("torchvision")
        return torchvision_models.load(copy)


def _size(name: str) -> int:
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    return 96 if name.startswith("inception") else 64


def one(name: str, copy: Path) -> dict[str, Any]:
    """Prune one model; the row of the results."""
    import regrow  # noqa: PLC0415

    models = _models(copy)
    kwargs: dict[str, Any] = {"num_classes": 10}
    if name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    torch.manual_seed(0)
    model = _random_classifier(models.get_model(name, **kwargs).eval())  # ViT's zero head would prove nothing
    size = _size(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    report = regrow.prune(model, pattern="channel", macs=BUDGET, example_inputs=x, keep_dense=False).structure
    seconds = time.perf_counter() - start
    left_out = [
        f"{g['name']}: {g['excluded']}" for g in report.groups if g["excluded"] and not g["excluded"].startswith(BENIGN)
    ]
    return {
        "model": name,
        "size": size,
        "macs_kept": round(report.macs_ratio, 4),
        "within": abs(report.macs_ratio - BUDGET) <= TOLERANCE * BUDGET,
        "check": report.equivalence.passed,
        "left_out": left_out,
        "seconds": round(seconds, 1),
    }


def _run(name: str, copy: Path, limit: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.torchvision_sweep", "--one", name, "--torchvision-models", str(copy)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": _size(name), "error": f"no result within {limit} s"}
    if done.returncode == 0:
        try:
            return json.loads(done.stdout.splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"model": name, "size": _size(name), "error": "the child printed no result"}
    # A Python failure prints "Type: message" after its traceback (a message may run over several lines); a process
    # killed (out of memory) ends with whatever it printed last, so then only its exit code is reported.
    raised = [m for m in re.finditer(r"^[\w.]*(Error|Exception): .*", done.stderr, re.MULTILINE)]
    if done.returncode == 1 and raised:
        error = done.stderr[raised[-1].start() :].removeprefix("regrow.errors.")
    else:
        error = f"the process ended with code {done.returncode}"
    return {"model": name, "size": _size(name), "error": " ".join(error.split())[:600]}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _write(out: Path, rows: list[dict[str, Any]], info: dict[str, Any], total: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "torchvision_sweep.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    table = [
        [r["model"], r["size"], r["macs_kept"], "yes" if r["within"] else "**no**", r["check"], r["seconds"],
         _cell("; ".join(r["left_out"]) or "none")]
        if "error" not in r
        else [r["model"], r["size"], "", "**failed**", "", "", _cell(r["error"])]
        for r in rows
    ]  # fmt: skip
    passed = sum(1 for r in rows if "error" not in r and r["within"] and r["check"] and not r["left_out"])
    text = [
        "# Every torchvision classifier, pruned by channel to half its MACs",
        "",
        stamp_markdown(info),
        "",
        ("" if len(rows) == total else f"**Partial: {len(rows)} of {total} models done.** ")
        + f"{passed} of {len(rows)} models reach `macs={BUDGET}` within {TOLERANCE:.0%} with the check passing and no "
        "group left out for a reason that is not benign (the classifier's outputs, attention's inner widths).",
        "",
        markdown_table(["model", "px", "MACs kept", "within 2 %", "check", "s", "left out / failure"], table),
        "",
    ]
    (out / "torchvision_sweep.md").write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="torchvision model names (default: every classifier)")
    parser.add_argument("--torchvision-models", type=Path, default=torchvision_models.DEFAULT)
    parser.add_argument("--limit", type=int, default=600, help="seconds per model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/torchvision_sweep"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, its row as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.torchvision_models)))
        return
    info = stamp()
    models = _models(args.torchvision_models)
    names = args.models or models.list_models(module=models)
    rows = []
    for name in names:
        rows.append(_run(name, args.torchvision_models, args.limit))
        print(json.dumps(rows[-1]), flush=True)
        _write(args.out, rows, info, len(names))


if __name__ == "__main__":
    main()
