"""Every classifier of ``torchvision.models``, or one model of each timm architecture, pruned by channel to half
its MACs on this machine.

    python -m benchmarks.sweep --source torchvision --out benchmarks/results/sweep
    python -m benchmarks.sweep --source timm --out benchmarks/results/sweep
    python -m benchmarks.sweep --source torchvision --models resnet18 swin_t --out /tmp/sweep  # a few

torchvision: all its classification models. timm: of each module of ``timm.models`` (one architecture family
each: ``resnet``, ``convnext``, ``levit``, ...), the model with the fewest parameters, leaving out timm's
``test_*`` models (widths of a few channels, for timm's own tests); ``--models`` names others.

Random initial weights (seed 0; a classifier that starts at zero gets random ones, and batch norms the statistics of
the model's own activations, as in benchmarks.zoo), 10 classes,
``regrow.prune(model, pattern="channel", macs=0.5, example_inputs=torch.randn(2, 3, S, S))``. S: 64 px for a
convolutional network, 96 for torchvision's Inception-v3 (its smallest input), the input size a model is
built for when it fixes one (ViT, Swin, MaxViT, ...; timm's ``fixed_input_size``), timm's ``min_input_size``
where it gives one; a model that does not run at that size yet names no minimum (Inception) gets the next of
96 px, 128 px and its default size that runs. Each model runs in its own process with a time limit, so that one that
hangs or runs out of memory is reported and the others still run. Per model: MACs kept, whether the equivalence
check passed (vacuous: outputs so small that its tolerance is 1 % of them or more, too coarse to tell a wrong
surgery), groups left out for a reason that is not benign, seconds to prune (tracing included), or the failure's
first line. Where torchvision does not import (a CPU-only torch) the unpacked copy ``make install`` puts in
``.venv/torchvision-models`` is used (benchmarks.torchvision_models); timm then imports that copy.
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
from torch import nn

from benchmarks import torchvision_models
from benchmarks.common import markdown_table, stamp, stamp_markdown
from benchmarks.zoo import _random_classifier, live_norms

BUDGET, TOLERANCE = 0.5, 0.02
# Groups left out by design: the classifier's outputs, attention's inner widths (pattern 'head' shrinks them where
# it can take the attention; where it cannot, the reason says so, and nothing shrinks them), the channels a
# ShuffleNet shuffle interleaves (regrow.structural.shuffle) and the outputs of a Linear over a sequence's tokens,
# the tokens themselves (regrow.structural.tokens), a group of a single channel and the channels an unbind makes
# tensors of their own (CSATv2's spatial attention: no pruning could take any of them).
SHUFFLED = "its channels go through the channel shuffle"
TOKENS = "its channels are the tokens of a sequence"
SINGLE, UNBOUND = "it has a single channel", "an unbind makes each of its channels a tensor of its own"
BENIGN = ("not a target", "its channels are the model's output", "inside attention", SHUFFLED, TOKENS, SINGLE, UNBOUND)
TITLES = {
    "torchvision": "Every torchvision classifier, pruned by channel to half its MACs",
    "timm": "One model of each timm architecture, pruned by channel to half its MACs",
}


def _torchvision(copy: Path) -> Any:
    try:
        import torchvision.models as models  # noqa: PLC0415 - where torchvision imports, use it

        return models
    except Exception:  # noqa: BLE001 - a CUDA build beside the CPU torch fails in several ways
        torchvision_models.drop("torchvision")
        return torchvision_models.load(copy)


def _timm(copy: Path) -> Any:
    try:
        import torchvision  # noqa: F401, PLC0415 - timm imports it
    except Exception:  # noqa: BLE001 - as above
        torchvision_models.drop("torchvision")
        torchvision_models.load(copy, keep=True)
    import timm  # noqa: PLC0415

    return timm


def _torchvision_model(name: str, copy: Path) -> tuple[nn.Module, int]:
    models = _torchvision(copy)
    kwargs: dict[str, Any] = {"num_classes": 10}
    if name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    size = 224 if name.startswith(("vit", "swin", "maxvit")) else 96 if name.startswith("inception") else 64
    return models.get_model(name, **kwargs), size


def _timm_model(name: str, copy: Path) -> tuple[nn.Module, int]:
    model = _timm(copy).create_model(name, pretrained=False, num_classes=10)
    config = model.pretrained_cfg
    if config.get("fixed_input_size"):
        return model, config["input_size"][-1]
    smallest = max(64, (config.get("min_input_size") or (3, 0, 0))[-1])
    # A model may not run at that size yet name no minimum (Inception needs 75 px): the next that runs.
    for size in sorted({smallest, *(s for s in (96, 128) if s > smallest), config["input_size"][-1]}):
        try:
            with torch.no_grad():
                model.eval()(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
        except RuntimeError:
            continue
        return model, size
    return model, config["input_size"][-1]  # none runs: the failure shows in the row


def one(source: str, name: str, copy: Path) -> dict[str, Any]:
    """Prune one model; the row of the results."""
    import regrow  # noqa: PLC0415

    torch.manual_seed(0)
    model, size = (_timm_model if source == "timm" else _torchvision_model)(name, copy)
    model = _random_classifier(model.eval())  # a zero classifier (torchvision's ViT head) would prove nothing
    model = live_norms(model, size)  # batch norms at 0 / 1 shrink the outputs below the check's tolerance
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    report = regrow.prune(model, pattern="channel", macs=BUDGET, example_inputs=x, keep_dense=False).structure
    seconds = time.perf_counter() - start
    left_out = [
        f"{g['name']}: {g['excluded']}" for g in report.groups if g["excluded"] and not g["excluded"].startswith(BENIGN)
    ]
    eq = report.equivalence
    return {
        "model": name,
        "size": size,
        "macs_kept": round(report.macs_ratio, 4),
        "within": abs(report.macs_ratio - BUDGET) <= TOLERANCE * BUDGET,
        "check": eq.passed,
        # outputs so small that the check's tolerance is 1 % of them or more: it could not tell (regrow warns so)
        "judged": eq.judges,
        "output_scale": None if eq.scale is None else float(f"{eq.scale:.3g}"),
        "left_out": left_out,
        "seconds": round(seconds, 1),
    }


def _run(source: str, name: str, copy: Path, limit: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.sweep", "--source", source, "--one", name]
    command += ["--torchvision-models", str(copy)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": "", "error": f"no result within {limit} s"}
    if done.returncode == 0:
        try:
            return json.loads(done.stdout.splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"model": name, "size": "", "error": "the child printed no result"}
    # A Python failure prints "Type: message" after its traceback (a message may run over several lines); a process
    # killed (out of memory) ends with whatever it printed last, so then only its exit code is reported.
    raised = [m for m in re.finditer(r"^[\w.]*(Error|Exception): .*", done.stderr, re.MULTILINE)]
    if done.returncode == 1 and raised:
        error = done.stderr[raised[-1].start() :].removeprefix("regrow.errors.")
    else:
        error = f"the process ended with code {done.returncode}"
    return {"model": name, "size": "", "error": " ".join(error.split())[:600]}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _judged(row: dict[str, Any]) -> bool:
    """Whether the check passed on outputs large enough for it to tell (not known of rows from before it was
    recorded: not counted)."""
    return bool(row["check"]) and bool(row.get("judged"))


def _check(row: dict[str, Any]) -> str:
    if not row["check"]:
        return "**False**"
    if "judged" not in row:
        return "True (scale not recorded)"
    return "True" if row["judged"] else "vacuous"


def _write(out: Path, source: str, rows: list[dict[str, Any]], runs: list[dict[str, Any]], total: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    saved = {"runs": runs, "total": total, "rows": rows}
    (out / f"{source}.json").write_text(json.dumps(saved, indent=1) + "\n")
    several = len({r["run"] for r in rows}) > 1
    table = [
        ([r["run"]] if several else [])
        + ([r["model"], r["size"], r["macs_kept"], "yes" if r["within"] else "**no**", _check(r), r["seconds"],
            _cell("; ".join(r["left_out"]) or "none")]
           if "error" not in r
           else [r["model"], r["size"], "", "**failed**", "", "", _cell(r["error"])])
        for r in rows
    ]  # fmt: skip
    passed = sum(1 for r in rows if "error" not in r and r["within"] and _judged(r) and not r["left_out"])
    vacuous = [r["model"] for r in rows if "error" not in r and r["check"] and r.get("judged") is False]
    used = {r["run"] for r in rows}  # a run whose rows were all measured again later is not listed
    stamps = [(f"Run {i}: " if several else "") + stamp_markdown(info) for i, info in enumerate(runs, 1) if i in used]
    header = ["model", "px", "MACs kept", "within 2 %", "check", "s", "left out / failure"]
    text = [
        f"# {TITLES[source]}",
        "",
        "\n\n".join(stamps),
        "",
        ("" if len(rows) == total else f"**Partial: {len(rows)} of {total} models done.** ")
        + f"{passed} of {len(rows)} models reach `macs={BUDGET}` within {TOLERANCE:.0%} with the check passing and no "
        "group left out for a reason that is not benign (the classifier's outputs, attention's inner widths, the "
        "channels a ShuffleNet shuffle interleaves, the tokens of a Linear over them, a single channel, channels an "
        "unbind makes tensors of their own)."
        + (
            f" The outputs of {len(vacuous)} ({', '.join(vacuous)}) were so small with these random weights that the "
            "check's tolerance was 1 % of them or more, so its pass says little (check: vacuous); they are not counted."
            if vacuous
            else ""
        ),
        "",
        markdown_table((["run"] if several else []) + header, table),
        "",
    ]
    (out / f"{source}.md").write_text("\n".join(text))


def _earlier(out: Path, source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The runs, rows and model count of an earlier results file (``--resume``); a file from before runs were
    numbered is run 1."""
    path = out / f"{source}.json"
    if not path.exists():
        return [], [], 0
    saved = json.loads(path.read_text())
    runs = saved.get("runs") or ([saved["info"]] if "info" in saved else [])
    return runs, [{"run": 1, **row} for row in saved["rows"]], saved.get("total", len(saved["rows"]))


def _timm_names(timm: Any) -> list[str]:
    """Of each timm module, the model with the fewest parameters (built on the meta device: no memory, no init)."""
    names = []
    for module in timm.list_modules():
        sizes = {}
        for name in timm.list_models(module=module, exclude_filters=["test_*"]):
            try:
                with torch.device("meta"):
                    sizes[name] = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # noqa: BLE001, S112 - a model that cannot be built on meta is not a candidate
                continue
        if sizes:
            names.append(min(sizes, key=sizes.__getitem__))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=sorted(TITLES), default="torchvision")
    parser.add_argument("--models", nargs="*", help="model names (default: see above)")
    parser.add_argument("--torchvision-models", type=Path, default=torchvision_models.DEFAULT)
    parser.add_argument("--limit", type=int, default=600, help="seconds per model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep"))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in the results file and run the models they lack (and those named by --models)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, its row as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.source, args.one, args.torchvision_models)))
        return
    runs, done, known = _earlier(args.out, args.source) if args.resume else ([], [], 0)
    runs.append(stamp())
    if args.models:
        names = args.models
    elif args.source == "timm":
        names = _timm_names(_timm(args.torchvision_models))
    else:
        models = _torchvision(args.torchvision_models)
        names = models.list_models(module=models)
    # --resume keeps the earlier rows; a model named with --models is run again, its row replaced in place.
    rows = done
    rerun = set(names) if args.models else set()
    for name in names:
        if any(r["model"] == name for r in rows) and name not in rerun:
            continue
        row = {"run": len(runs), **_run(args.source, name, args.torchvision_models, args.limit)}
        at = next((i for i, r in enumerate(rows) if r["model"] == name), len(rows))
        rows[at : at + 1] = [row]
        total = max(known, len({r["model"] for r in rows} | set(names)))
        print(json.dumps(row), flush=True)
        _write(args.out, args.source, rows, runs, total)


if __name__ == "__main__":
    main()
