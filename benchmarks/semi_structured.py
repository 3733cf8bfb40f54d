"""2:4 transformer MLP blocks on sparse tensor cores: dense kernels against ``regrow.accelerate`` (CUDA only).

Run: python -m benchmarks.semi_structured   (well under 2 minutes on an H200; on a machine without CUDA it
prints why nothing can be measured and exits with status 2)

For each block shape (d -> hidden -> d: Linear, GELU, Linear) and dtype, a block with random weights is pruned
to 2:4 by ``regrow.prune(pattern="2:4")`` on a copy; that copy is timed with its dense kernels against a second
copy converted by ``regrow.accelerate`` (both hold the same 2:4 values, so the relative error is the sparse
kernel's own numerical difference, not the pruning's). For each token count both are timed two ways, in this
process, one after the other, with CUDA events, warm-up and the median of the repeats:

* eager: ``model(x)`` as a user calls it, host launch cost included (the notes measured ~0.75-1.2 ms of host
  cost per sparse call on a gVisor VM, which can outweigh the kernel's gain);
* CUDA graph: each model captured once and replayed, i.e. kernel time.

The goal of the issue is >= 1.2x at 4,096 tokens and above (CUDA-graph kernel time); every cell below 1x is
listed under the table. Results: benchmarks/results/semi_structured.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

import regrow
from benchmarks.common import RESULTS, markdown_table, stamp
from regrow.accelerate import CPU_MESSAGE, measure_speedup
from regrow.errors import RegrowError, SpeedWarning

SHAPES = [(2048, 8192), (4096, 16384), (8192, 28672)]  # (d, hidden): 4096 -> 16384 and Llama-70B-like 8192 -> 28672
TOKENS = [1024, 2048, 4096, 8192]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
GOAL = 1.2  # at GOAL_TOKENS and above, CUDA-graph kernel time
GOAL_TOKENS = 4096


class MLPBlock(nn.Module):
    """A transformer MLP block: Linear d -> hidden, GELU, Linear hidden -> d."""

    def __init__(self, d: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, device="cuda", dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d, device="cuda", dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def gpu_stamp() -> dict[str, Any]:
    info = stamp()
    info |= {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version(),
    }
    return info


def blocks(d: int, hidden: int, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The 2:4 block run densely, and a copy accelerated; the acceleration report as a dict."""
    torch.manual_seed(0)
    dense = MLPBlock(d, hidden, dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpeedWarning)  # "2:4 is not faster on dense kernels": measured here
        masks = regrow.prune(dense, pattern="2:4", targets=["fc1", "fc2"], keep_dense=False)
    sparse = copy.deepcopy(dense)
    report = regrow.accelerate(sparse, masks)
    if report.left_dense:
        raise RuntimeError(f"regrow.accelerate left layers dense: {report.left_dense}")
    return dense, sparse, report.to_dict()


def measure(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    eager = measure_speedup(dense, sparse, x, repeats=args.repeats, warmup=args.warmup)
    row = {"dense_eager_ms": eager.dense_ms, "sparse_eager_ms": eager.accelerated_ms, "eager_speedup": eager.speedup}
    row["relative_error"] = eager.relative_error
    if not args.no_graph:
        graph = measure_speedup(dense, sparse, x, repeats=args.repeats, warmup=args.warmup, cuda_graph=True)
        row["graph_timing"] = graph.timing
        if graph.timing == "cuda_graph":  # else capture failed and these would be eager numbers again
            row |= {"dense_graph_ms": graph.dense_ms, "sparse_graph_ms": graph.accelerated_ms}
            row["graph_speedup"] = graph.speedup
    return row


def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    rows, reports, skipped = [], {}, []
    start = time.perf_counter()
    for d, hidden in args.shapes:
        for name in args.dtypes:
            key = f"{d}->{hidden}->{d} {name}"
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"{key}: not measured, time budget of {args.budget_s:.0f} s spent")
                continue
            try:
                dense, sparse, reports[key] = blocks(d, hidden, DTYPES[name])
            except (RegrowError, RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                skipped.append(f"{key}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                print("skipped", skipped[-1], flush=True)
                continue
            with torch.inference_mode():
                for tokens in args.tokens:
                    x = torch.randn(tokens, d, device="cuda", dtype=DTYPES[name])
                    row = {"block": f"{d}->{hidden}->{d}", "dtype": name, "tokens": tokens}
                    row |= measure(dense, sparse, x, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del dense, sparse
            torch.cuda.empty_cache()
    return rows, reports, skipped


def fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"**{value:.2f}x**" if value < 1.0 else f"{value:.2f}x"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], reports: dict[str, Any], skipped: list[str]) -> str:
    header = ["block", "dtype", "tokens", "dense eager ms", "2:4 eager ms", "eager speed-up", "dense graph ms",
              "2:4 graph ms", "graph speed-up", "relative error"]  # fmt: skip
    table = []
    for r in rows:
        table.append([r["block"], r["dtype"], r["tokens"], fmt_ms(r["dense_eager_ms"]), fmt_ms(r["sparse_eager_ms"]),
                      fmt_ratio(r["eager_speedup"]), fmt_ms(r.get("dense_graph_ms")), fmt_ms(r.get("sparse_graph_ms")),
                      fmt_ratio(r.get("graph_speedup")), f"{r['relative_error']:.1e}"])  # fmt: skip
    goal = [r for r in rows if r["tokens"] >= GOAL_TOKENS and "graph_speedup" in r]
    met = [r for r in goal if r["graph_speedup"] >= GOAL]
    slower = [f"{r['block']} {r['dtype']} at {r['tokens']} tokens: {mode} {r[key]:.2f}x"
              for r in rows for mode, key in (("eager", "eager_speedup"), ("graph", "graph_speedup"))
              if key in r and r[key] < 1.0]  # fmt: skip
    graph_modes = sorted({r["graph_timing"] for r in rows if "graph_timing" in r})
    backends = ", ".join(sorted({r["backend"] for r in reports.values()}))
    lines = [
        "# 2:4 MLP blocks on sparse tensor cores (regrow.accelerate)",
        "",
        f"Command: `{info['command']}`  ",
        f"Measured {info['date']} on {info['gpu']} (compute capability {info['capability']}), torch {info['torch']}, "
        f"CUDA {info['cuda']}, cuSPARSELt {info['cusparselt']}, regrow {info['regrow']}.",
        "",
        "Dense = the 2:4-pruned block in dense kernels; 2:4 = the same block after `regrow.accelerate` (backend "
        f"auto: {backends or 'none'}). Median of the repeats after warm-up, CUDA events. Eager includes host launch "
        "cost; graph = CUDA graph replay (kernel time). Relative error = ||y_2:4 - y_dense|| / ||y_dense||. "
        "**Bold**: below 1x.",
        "",
        markdown_table(header, table),
        "",
        f"Goal: >= {GOAL}x (graph) at >= {GOAL_TOKENS} tokens: met in {len(met)} of {len(goal)} cells"
        + ("." if goal else " (no CUDA-graph timings: not evaluated)."),
        f"Graph timing modes: {', '.join(graph_modes) or 'not measured'}.",
        "",
        "Below 1x: " + ("; ".join(slower) if slower else "none") + ".",
    ]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{d}x{h}" for d, h in SHAPES), help="d x hidden, comma-separated")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="bfloat16,float16")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-graph", action="store_true", help="eager timing only")
    parser.add_argument("--budget-s", type=float, default=100.0, help="stop starting new blocks after this long")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = parser.parse_args()
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtypes {unknown}; allowed: {', '.join(DTYPES)}")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        print(f"benchmarks.semi_structured: nothing measured. {CPU_MESSAGE}", file=sys.stderr)
        sys.exit(2)
    info = gpu_stamp()
    started = time.perf_counter()
    rows, reports, skipped = run_all(args)
    info["seconds"] = round(time.perf_counter() - started, 1)
    text = markdown(rows, info, reports, skipped)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "semi_structured.md").write_text(text, encoding="utf-8")
        payload = {"info": info, "rows": rows, "acceleration": reports, "skipped": skipped}
        (RESULTS / "semi_structured.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
