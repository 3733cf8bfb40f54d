"""Speed of a recovery step on a GPU: regrow.recover against a hand-written masked training loop.

Run: python -m benchmarks.gpu_recovery [--steps 30] [--warmup 10] [--rounds 2] [--models resnet50 vit_s]
     python -m benchmarks.gpu_recovery --smoke      (tiny models on the CPU: checks the script, times nothing useful)

Cases (synthetic data on the device, no downloads; 50 % unstructured global-magnitude masks on every Conv /
Linear weight but the classifier):

* ResNet-50 (torchvision if importable, else timm), 224x224, batch 128;
* ViT-S/16 (timm ``vit_small_patch16_224``), 224x224, batch 128.

Variants, all on the same pruned model (a fresh copy each), the same batch and AdamW (lr 1e-3, weight decay
5e-4), each at fp32 and bf16:

* **hand-written**: ``autocast`` forward, cross-entropy, ``backward``, ``grad *= mask`` and, after
  ``optimizer.step()``, ``weight *= mask``, both as one ``torch._foreach_mul_``; channels-last when regrow's
  ``channels_last="auto"`` picks it (ResNet-50: yes, ViT-S: no), so both loops compute the same thing;
* **regrow finetune**: ``regrow.recover(method="finetune", precision=...)``, one epoch of ``warmup + steps``
  steps, with its defaults otherwise (cosine schedule, training metrics summed on the device, progress bars
  off);
* **regrow distill** (bf16 only): the same with the dense model as the teacher.

Timing: a CUDA event is recorded after every step (by a regrow step callback, ``on_step_end``, which runs
after the optimizer step; in the hand-written loop at the same point) and the time of a step is the time
between two consecutive events, i.e. everything the step puts on the GPU and any wait for the host in
between. Validation, set-up and the first ``warmup`` steps fall outside those intervals. The median over
``steps`` steps and ``rounds`` interleaved rounds is reported, with regrow / hand-written and bf16 / fp32
ratios. cuDNN and TF32 flags are torch's defaults, stated in the results, and the same for every variant.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import regrow
from benchmarks.common import RESULTS, markdown_table, stamp
from regrow.recovery.compute import convolutional

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def resnet50() -> tuple[nn.Module, str]:
    try:
        import torchvision

        return torchvision.models.resnet50(weights=None), "torchvision resnet50"
    except ImportError:
        import timm

        return timm.create_model("resnet50", pretrained=False), "timm resnet50"


def vit_small() -> tuple[nn.Module, str]:
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False), "timm vit_small_patch16_224"


def tiny_resnet() -> tuple[nn.Module, str]:
    from regrow.models import MODELS

    return MODELS.get("resnet")(width=8, blocks=(1, 1), num_classes=10, in_channels=3), "regrow resnet (tiny)"


def tiny_vit() -> tuple[nn.Module, str]:
    from regrow.models import ViT

    return ViT(dim=32, depth=2, heads=2, patch=4, image_size=16, num_classes=10, in_channels=3), "regrow vit (tiny)"


# name -> (builder, image size, batch, classes)
CASES: dict[str, tuple[Callable[[], tuple[nn.Module, str]], int, int, int]] = {
    "resnet50": (resnet50, 224, 128, 1000),
    "vit_s": (vit_small, 224, 128, 1000),
}
SMOKE: dict[str, tuple[Callable[[], tuple[nn.Module, str]], int, int, int]] = {
    "resnet50": (tiny_resnet, 16, 4, 10),
    "vit_s": (tiny_vit, 16, 4, 10),
}


class Clock:
    """Marks the end of each step: a CUDA event on the GPU, the wall clock (after a sync) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self, warmup: int) -> list[float]:
        """Milliseconds of each step after the first ``warmup`` (the interval between consecutive marks)."""
        if self.cuda:
            torch.cuda.synchronize()
            gaps = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        else:
            gaps = [(b - a) * 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return gaps[max(0, warmup - 1) :]


class StepClock(Clock):
    """The same clock as a regrow step callback."""

    def on_train_start(self, state: Any) -> None:
        pass

    def on_step_end(self, state: Any) -> None:
        self.mark()

    def checkpoint_ready(self, state: Any) -> bool:
        return True


def hand_written(
    model: nn.Module, masks: regrow.MaskSet, x: torch.Tensor, y: torch.Tensor, precision: str, n: int, warmup: int
) -> list[float]:
    """The reference: a plain masked AdamW loop, as a user would write it."""
    device = x.device
    if device.type == "cuda" and convolutional(model):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    params = [model.get_parameter(f) for f in masks]
    factors = [torch.empty_like(p).copy_(masks[f]) for p, f in zip(params, masks, strict=True)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    dtype = DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    clock = Clock(device)
    for _ in range(n):
        with autocast:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            torch._foreach_mul_([p.grad for p in params], factors)
            optimizer.step()
            torch._foreach_mul_(params, factors)
        clock.mark()
    assert all(torch.count_nonzero(p[~masks[f]]) == 0 for p, f in zip(params, masks, strict=True))
    return clock.step_ms(warmup)


def with_regrow(
    model: nn.Module,
    masks: regrow.MaskSet,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str,
    method: str,
    n: int,
    warmup: int,
) -> tuple[list[float], dict[str, Any]]:
    """regrow.recover for one epoch of ``n`` steps on the same batch; per-step times and its compute details."""
    clock = StepClock(x.device)
    result = regrow.recover(
        model,
        masks,
        [(x, y)] * n,
        [(x, y)],
        method=method,
        epochs=1,
        lr=1e-3,
        weight_decay=5e-4,
        patience=None,
        precision=precision,
        callbacks=[clock],
        progress=False,
    )
    assert all(torch.count_nonzero(model.get_parameter(f)[~m]) == 0 for f, m in masks.items())
    return clock.step_ms(warmup), result.details["compute"]


def measure_case(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median ms per step of every variant of one model, over ``args.rounds`` interleaved rounds."""
    build, size, batch, classes = (SMOKE if args.smoke else CASES)[name]
    torch.manual_seed(0)
    base, source = build()
    base = base.to(device)
    masks = regrow.prune(base, 0.5, keep_dense=True)
    teacher = masks.dense
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, generator=g)
    y = torch.randint(0, classes, (batch,), device=device, generator=g)
    n = args.warmup + args.steps
    variants = [("hand-written", "fp32"), ("regrow finetune", "fp32"), ("hand-written", "bf16")]
    variants += [("regrow finetune", "bf16"), ("regrow distill", "bf16")]
    times: dict[str, list[float]] = {f"{v} {p}": [] for v, p in variants}
    compute: dict[str, Any] = {}
    for _ in range(args.rounds):
        for variant, precision in variants:
            model = copy.deepcopy(base)
            mask_copy = regrow.MaskSet({k: m.clone() for k, m in masks.items()}, spec=masks.spec)
            if variant == "hand-written":
                ms = hand_written(model, mask_copy, x, y, precision, n, args.warmup)
            else:
                mask_copy.dense = copy.deepcopy(teacher)
                method = variant.split()[1]
                ms, compute[f"{method} {precision}"] = with_regrow(
                    model, mask_copy, x, y, precision, method, n, args.warmup
                )
            times[f"{variant} {precision}"] += ms
            del model, mask_copy
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": source,
        "image": size,
        "batch": batch,
        "params": sum(p.numel() for p in base.parameters()),
        "sparsity": masks.sparsity(),
        "channels_last": compute.get("finetune fp32", {}).get("channels_last"),
        "median_ms": median,
        "steps_timed": {k: len(v) for k, v in times.items()},
        "ratios": {
            "regrow / hand-written, fp32": median["regrow finetune fp32"] / median["hand-written fp32"],
            "regrow / hand-written, bf16": median["regrow finetune bf16"] / median["hand-written bf16"],
            "hand-written bf16 speed-up over fp32": median["hand-written fp32"] / median["hand-written bf16"],
            "regrow bf16 speed-up over fp32": median["regrow finetune fp32"] / median["regrow finetune bf16"],
            "regrow distill / finetune, bf16": median["regrow distill bf16"] / median["regrow finetune bf16"],
        },
        "compute": compute,
    }


def flags(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        out |= {
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    for pkg in ("torchvision", "timm"):
        try:
            out[pkg] = __import__(pkg).__version__
        except ImportError:
            out[pkg] = None
    return out


def markdown(results: dict[str, Any], info: dict[str, Any], args: argparse.Namespace) -> str:
    env = info["environment"]
    lines = [
        "# Recovery step speed on a GPU: regrow against a hand-written masked loop",
        "",
        f"Command: `{info['command']}`  ",
        f"Measured {info['date']} on {env.get('gpu', env['device'])} (CUDA {env.get('cuda')}, cuDNN "
        f"{env.get('cudnn')}; cudnn.benchmark {env.get('cudnn.benchmark')}, TF32 convolutions "
        f"{env.get('cudnn.allow_tf32')}, TF32 matmuls {env.get('matmul.allow_tf32')}), torch {info['torch']}, "
        f"torchvision {env.get('torchvision')}, timm {env.get('timm')}, regrow {info['regrow']}, "
        f"Python {info['python']}.",
        "",
        f"Median milliseconds per training step (AdamW, 50 % unstructured masks, synthetic data on the device) over "
        f"{args.steps} steps after {args.warmup} warm-up steps, {args.rounds} interleaved round(s); the time of a "
        "step is the interval between CUDA events (with --smoke on a CPU: wall-clock marks) recorded after "
        "consecutive optimizer steps, so validation and set-up are outside it. See the script's docstring for what "
        "each variant does.",
        "",
    ]
    header = ["model", "variant", "fp32 ms", "bf16 ms", "bf16 speed-up"]
    rows = []
    ratio_rows = []
    for r in results.values():
        m = r["median_ms"]
        label = f"{r['model']}, {r['image']}x{r['image']}, batch {r['batch']}"
        for variant in ("hand-written", "regrow finetune"):
            fp32, bf16 = m[f"{variant} fp32"], m[f"{variant} bf16"]
            rows.append([label, variant, f"{fp32:.2f}", f"{bf16:.2f}", f"{fp32 / bf16:.2f}x"])
        rows.append([label, "regrow distill", "", f"{m['regrow distill bf16']:.2f}", ""])
        ratio_rows.append([label, "yes" if r["channels_last"] else "no"] + [f"{v:.3f}" for v in r["ratios"].values()])
    lines += [markdown_table(header, rows), ""]
    ratio_header = ["model", "channels-last"] + list(next(iter(results.values()))["ratios"])
    lines += ["Ratios (target: regrow / hand-written at most 1.05):", "", markdown_table(ratio_header, ratio_rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant and round (default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all variants")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few steps: checks the script")
    parser.add_argument("--out", default=None, help="results path without suffix (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 10)
    if args.smoke:
        device = torch.device("cpu")
        args.rounds = 1
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("benchmarks.gpu_recovery needs a CUDA device; run with --smoke to check the script on a CPU.")
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "gpu_recovery_smoke" if args.smoke else RESULTS / "gpu_recovery"
    )  # fmt: skip
    info = stamp() | {"environment": flags(device)}
    started = time.perf_counter()
    results = {}
    for name in args.models:
        results[name] = measure_case(name, args, device)
        print(name, json.dumps(results[name]["median_ms"]), json.dumps(results[name]["ratios"]), flush=True)
    info["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(results, info, args)
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    saved = json.dumps(info | {"results": results}, indent=1, default=str)
    out.with_suffix(".json").write_text(saved, encoding="utf-8")
    print(text)
    print(f"written: {out.with_suffix('.md')} and .json ({info['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
