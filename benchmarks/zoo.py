"""Structural pruning on the real torchvision and timm models users bring: budget, check, measured speed-up.

Run on a CUDA machine with torchvision and timm installed (about 3 minutes for all 14 models on an H200):

    python -m benchmarks.zoo
    python -m benchmarks.zoo --device cpu --models timm:resnet18 --batch 4 --image-size 64 --out /tmp/zoo  # smoke
    python -m benchmarks.zoo --device cpu --torchvision-models .venv/torchvision-models --dtypes fp32 --batch 8 \
        --rounds-small 10 --rounds-large 5 --deadline 3600 --out benchmarks/results/zoo_cpu  # all 14 on a CPU

Every model gets random initial weights (seed 0; a classifier that starts at zero gets random ones; batch norms
the statistics of its own activations, :func:`live_norms`) and is pruned on its device as the GPU issue did:
``regrow.prune(model, pattern="channel", macs=0.5, example_inputs=torch.randn(2, 3, S, S))``. Per model: the
time to prune, the MACs kept, whether the equivalence check passed, parameters before and after, and the
latency of the dense and the shrunk model at batch 1 and at a large batch, in float32 (torch's default
flags, stated in the results) and in bfloat16 (weights and inputs cast). Latency: warm-up, then dense and
shrunk timed alternately, each pass between two CUDA events (perf_counter on a CPU), median of the passes.
A model that fails is reported with its message; the others still run. Results are written after every model
to ``benchmarks/results/zoo.md`` and ``zoo.json`` with the command, versions and GPU name.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

import regrow
from benchmarks import torchvision_models
from benchmarks.common import RESULTS, markdown_table, stamp, stamp_markdown

MODELS = [
    "torchvision:resnet50",
    "torchvision:mobilenet_v2",
    "torchvision:densenet121",
    "torchvision:vit_b_16",
    "timm:resnet18",
    "timm:resnext50_32x4d",
    "timm:mobilenetv3_large_100",
    "timm:efficientnet_b0",
    "timm:convnext_tiny",
    "timm:regnety_016",
    "timm:ghostnet_100",
    "timm:levit_128",
    "timm:vit_small_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
]
BUDGET = 0.5
TOLERANCE = 0.02  # relative, as regrow defines it
PRUNE_LIMIT_S = 60.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(spec: str, image_size: int) -> nn.Module:
    """The model ``source:name`` with random weights, for ``image_size`` inputs."""
    source, _, name = spec.partition(":")
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        if getattr(torchvision, "STAND_IN", False):
            raise RuntimeError("only regrow's test stand-in for torchvision is importable (tests/stubs)")
        kwargs = {"image_size": image_size} if name.startswith("vit_") and image_size != 224 else {}
        model = _random_classifier(torchvision.models.get_model(name, weights=None, **kwargs).eval())
        return live_norms(model, image_size)
    if source == "timm":
        import timm

        kwargs: dict[str, Any] = {}
        if image_size != 224 and name.startswith(("vit_", "deit_", "levit_", "swin_")):
            kwargs["img_size"] = image_size
            if name.startswith("swin_"):
                kwargs["window_size"] = max(1, image_size // 32)
        return live_norms(timm.create_model(name, pretrained=False, **kwargs), image_size)
    raise ValueError(f"unknown model source in {spec!r}: use torchvision:NAME or timm:NAME")


def live_norms(model: nn.Module, size: int, passes: int = 4) -> nn.Module:
    """``model`` in eval mode, its batch norms holding the running statistics of its own activations.

    Built with random weights, a batch norm's running statistics are 0 and 1 whatever it is fed: in eval mode the
    activations then shrink (or grow) layer by layer, and torchvision's EfficientNets, MobileNets and MNASNets
    ended with outputs of 1e-7 to 1e-15 (the sweep, at 64 px), below the equivalence check's absolute tolerance,
    which any surgery then passes. A few passes over random ``size`` x ``size`` images, without gradients, the
    norms alone in train mode, give each norm the mean and variance it sees (a cumulative average); the weights are
    untouched, and so is every other module's mode and the global random state."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.eval()  # only the norms train: dropout, stochastic depth and train-only heads stay as in eval
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for _ in range(passes if norms else 0):
                model(torch.randn(4, 3, size, size, generator=generator))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model


def _random_classifier(model: nn.Module) -> nn.Module:
    """torchvision starts some classifiers at zero (VisionTransformer's head): every output would be 0 and the
    equivalence check would pass any surgery. timm scales EVA's and BEiT's by 0.001 (``head_init_scale``), for
    outputs of 2e-4 to 6e-4 (the zoo tests' EVA and BEiT), where the check's tolerance is 2 to 4 % of them. A
    Linear whose weights are all below 1e-3 gets random ones (normal, std 0.02)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.numel() and module.weight.abs().max() < 1e-3:
            nn.init.normal_(module.weight, std=0.02)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def one_pass_ms(model: nn.Module, x: torch.Tensor) -> float:
    """One forward pass: between two CUDA events on a GPU, by the wall clock on a CPU."""
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    model(x)
    return (time.perf_counter() - begin) * 1000.0


def latency_pair(dense: nn.Module, shrunk: nn.Module, x: torch.Tensor, rounds: int, warmup: int) -> tuple[float, float]:
    """Median milliseconds of ``dense`` and ``shrunk`` on ``x``, timed alternately (the order swaps each round)."""
    for _ in range(warmup):
        one_pass_ms(dense, x)
        one_pass_ms(shrunk, x)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            times[i].append(one_pass_ms((dense, shrunk)[i], x))
    return statistics.median(times[0]), statistics.median(times[1])


def speed(dense: nn.Module, shrunk: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Latency of both models per dtype and batch size; the speed-up is dense / shrunk."""
    out: dict[str, Any] = {}
    for label, dtype in DTYPES.items():
        if label not in args.dtypes:
            continue
        d, s = copy.deepcopy(dense).to(dtype), copy.deepcopy(shrunk).to(dtype)
        for batch, rounds in ((1, args.rounds_small), (args.batch, args.rounds_large)):
            x = torch.randn(batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
            dense_ms, shrunk_ms = latency_pair(d, s, x, rounds, args.warmup)
            out[f"{label}_b{batch}"] = {
                "batch": batch,
                "rounds": rounds,
                "dense_ms": round(dense_ms, 4),
                "shrunk_ms": round(shrunk_ms, 4),
                "speedup": round(dense_ms / shrunk_ms, 3),
            }
        del d, s
    return out


def measure(spec: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Prune one model and time it; the row of the results."""
    row: dict[str, Any] = {"model": spec}
    model = build(spec, args.image_size).to(device)
    dense = copy.deepcopy(model)
    x = torch.randn(args.prune_batch, 3, args.image_size, args.image_size, device=device)
    sync(device)
    start = time.perf_counter()
    report = regrow.prune(model, pattern="channel", macs=BUDGET, example_inputs=x, keep_dense=False).structure
    sync(device)
    row["prune_s"] = round(time.perf_counter() - start, 2)
    excluded = [g for g in report.groups if g["excluded"] and g["excluded"] != "not a target"]
    row |= {
        "macs_ratio": round(report.macs_ratio, 4),
        "within_budget": abs(report.macs_ratio - BUDGET) <= TOLERANCE * BUDGET,
        "check_passed": report.equivalence.passed,
        "max_abs_diff": report.equivalence.max_abs_diff,
        # outputs so small that the check's tolerance is 1 % of them or more: it could not tell a wrong surgery
        "output_scale": report.equivalence.scale,
        "check_judged": report.equivalence.judges,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "groups": len(report.groups),
        "groups_left_out": len(excluded),
        "left_out_reasons": sorted({g["excluded"][:120] for g in excluded}),
        "evaluations": report.evaluations,
        "round_to": report.round_to,
        "warnings": report.warnings,
    }
    row["latency"] = speed(dense.eval(), model.eval(), args, device)
    return row


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, GPU and the float32 flags the fp32 timings ran with."""

    def version(module: str) -> str:
        try:
            imported = __import__(module)
        except Exception as exc:  # noqa: BLE001 - absent or broken: say which
            return f"not importable ({type(exc).__name__})"
        if getattr(imported, "STAND_IN", False):
            return "regrow's test stand-in (tests/stubs)"
        return str(getattr(imported, "__version__", "?"))

    def flag(read: Any) -> Any:
        try:
            return read()
        except RuntimeError:  # torch refuses a legacy read once the per-backend API has set the flag
            return "set through fp32_precision"

    env: dict[str, Any] = {
        "device": str(device),
        "torchvision": version("torchvision"),
        "timm": version("timm"),
        "cudnn_allow_tf32": flag(lambda: torch.backends.cudnn.allow_tf32),
        "cuda_matmul_allow_tf32": flag(lambda: torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": flag(torch.get_float32_matmul_precision),
    }
    if device.type == "cuda":
        env |= {
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return env


def _cell(latency: dict[str, Any], key: str) -> str:
    entry = latency.get(key)
    if entry is None:
        return "-"
    return f"{entry['dense_ms']:.3g} / {entry['shrunk_ms']:.3g} ({entry['speedup']:.2f}x)"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    env = info["environment"]
    keys = [f"{d}_b{b}" for d in args.dtypes for b in (1, args.batch)]
    header = ["model", "prune s", "MACs kept", "check", "params before -> after", "left out"]
    header += [f"{k.replace('_b', ' batch ')} ms dense / shrunk" for k in keys]
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["model"], "failed", row["error"][:160], *[""] * (len(header) - 3)])
            continue
        table.append(
            [
                row["model"],
                f"{row['prune_s']:.1f}",
                f"{row['macs_ratio']:.4f}" + ("" if row["within_budget"] else " (missed)"),
                ("passed" if row.get("check_judged", True) else "vacuous") if row["check_passed"] else "FAILED",
                f"{row['params_before'] / 1e6:.2f}M -> {row['params_after'] / 1e6:.2f}M",
                f"{row['groups_left_out']} of {row['groups']}",
                *[_cell(row["latency"], k) for k in keys],
            ]
        )
    lines = [
        "# Structural pruning on real torchvision and timm models",
        "",
        stamp_markdown(info) + "  ",
        f"Device: {env.get('gpu', env['device'])} (CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}); "
        f"torchvision {env['torchvision']}, timm {env['timm']}. float32 timings with torch's flags: cuDNN TF32 "
        f"{env['cudnn_allow_tf32']}, matmul TF32 {env['cuda_matmul_allow_tf32']}, matmul precision "
        f"{env['float32_matmul_precision']}.",
        "",
        f"Random initial weights (seed 0; a classifier that starts at zero, torchvision's ViT head, gets normal "
        f"ones, std 0.02, and batch norms the statistics of four train-mode passes over random images, so that the "
        f"check compares real outputs; 'vacuous': outputs so small that its tolerance is 1 % of them or more); "
        f"`regrow.prune(model, pattern='channel', macs={BUDGET}, "
        f"example_inputs=torch.randn({args.prune_batch}, 3, {args.image_size}, {args.image_size}))` on the device. "
        f"Latency: {args.warmup} warm-up passes, then dense and shrunk alternately, median of "
        f"{args.rounds_small} passes at batch 1 and {args.rounds_large} at batch {args.batch}; speed-up = dense / "
        "shrunk. 'left out': groups regrow did not prune (the classifier's outputs, attention's inner widths, ...).",
        "",
        markdown_table(header, table),
        "",
        *goals(rows, args),
    ]
    return "\n".join(lines) + "\n"


def goals(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The issue's acceptance lines, checked against the rows."""
    done = [r for r in rows if "error" not in r]
    lines = ["## Against the goals", ""]
    failed = [r["model"] for r in rows if "error" in r]
    missed = [
        r["model"] for r in done if not (r["within_budget"] and r["check_passed"] and r.get("check_judged", True))
    ]
    slow = [r["model"] for r in done if r["prune_s"] > PRUNE_LIMIT_S]
    lines.append(f"- Failed: {', '.join(failed) or 'none'}.")
    lines.append(f"- Budget missed (beyond 2 %) or check failed or vacuous: {', '.join(missed) or 'none'}.")
    lines.append(f"- Pruning over {PRUNE_LIMIT_S:.0f} s: {', '.join(slow) or 'none'}.")
    for r in done:
        if r["model"].endswith(":resnet50") and f"bf16_b{args.batch}" in r["latency"]:
            s = r["latency"][f"bf16_b{args.batch}"]["speedup"]
            verdict = "met" if s >= 1.5 else "not met"
            lines.append(f"- {r['model']} at half the MACs, bf16, batch {args.batch}: {s:.2f}x (goal 1.5x: {verdict}).")
    slower = [
        f"{r['model']} {k} ({v['speedup']:.2f}x)"
        for r in done
        for k, v in r["latency"].items()
        if v["batch"] == 1 and v["speedup"] < 1 / 1.05
    ]
    lines.append(f"- More than 5 % slower than dense at batch 1: {', '.join(slower) or 'none'}.")
    return lines


def write(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str), encoding="utf-8")
    (out / "zoo.md").write_text(markdown(rows, info, args), encoding="utf-8")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="source:name, e.g. timm:resnet18")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128, help="the large batch of the latency measurement")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prune-batch", type=int, default=2, help="batch of the example inputs given to prune")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds-small", type=int, default=30, help="timed passes per model at batch 1")
    parser.add_argument("--rounds-large", type=int, default=10, help="timed passes per model at the large batch")
    parser.add_argument("--deadline", type=float, default=190.0, help="seconds; models not started by then are skipped")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--torchvision-models",
        metavar="DIR",
        help="import torchvision's model code from this unpacked wheel, without its compiled operators (a CPU torch "
        "beside PyPI's CUDA-built torchvision; make install unpacks one in .venv/torchvision-models)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.torchvision_models:
        torchvision_models.load(Path(args.torchvision_models), keep=True)  # timm imports it too
    device = torch.device(args.device)
    info = stamp() | {"environment": environment(device), "settings": vars(args)}
    rows: list[dict[str, Any]] = []
    begin = time.perf_counter()
    poisoned = None
    for spec in args.models:
        if poisoned or time.perf_counter() - begin > args.deadline:
            why = f"CUDA context poisoned by {poisoned}" if poisoned else f"time budget of {args.deadline:g} s spent"
            rows.append({"model": spec, "error": f"not run: {why}"})
            continue
        try:
            row = measure(spec, args, device)
        except Exception as exc:  # noqa: BLE001 - one model's failure is a result; go on with the others
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" if str(exc) else repr(exc)
            row = {"model": spec, "error": message, "traceback": traceback.format_exc(limit=-3)}
            if "CUDA error" in str(exc) or "device-side assert" in str(exc):
                poisoned = spec
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "warnings")}, default=str), flush=True)
        write(rows, info, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info["total_s"] = round(time.perf_counter() - begin, 1)
    write(rows, info, args)
    return rows


if __name__ == "__main__":
    main()
