"""Peak memory and time of global unstructured pruning of large models: regrow against torch.nn.utils.prune.

Run: python -m benchmarks.memory [--sizes 300M 1B] [--limit-gib 22]

The model is a stack of twelve square ``nn.Linear`` layers (no bias): width 5000 for 300 M parameters
(1.12 GiB in float32), 9129 for 1 B (3.73 GiB). Every case runs in a fresh Python process, so that its peak
resident memory (``ru_maxrss``: the interpreter, torch, the model, the masks and every temporary) is its own;
the process builds the model, then prunes all twelve weights together to 90 % by magnitude:

* ``model only``: builds the model and stops (what any method costs before it starts);
* ``regrow keep_dense=False``: ``regrow.prune(model, 0.9, targets=all twelve, keep_dense=False)``;
* ``regrow keep_dense=True``: the same with the default dense copy kept (the distillation teacher);
* ``torch global_unstructured``: ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=0.9)``.

Each process runs under an address-space limit (``--limit-gib``, default 22 GiB of the machine's 24) so that
a case that needs more fails with torch's own out-of-memory error instead of the kernel killing it; such a
case is reported as failed, with the error. The peak is reported in GiB and as a multiple of the model's
float32 size; the time is the pruning call's wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

from benchmarks.common import RESULTS, markdown_table, stamp, stamp_markdown, write_csv

WIDTHS = {"300M": 5000, "1B": 9129}
LAYERS = 12
CASES = ("model only", "regrow keep_dense=False", "regrow keep_dense=True", "torch global_unstructured")
GIB = 1024**3


def build(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(LAYERS)))


def child(case: str, width: int) -> dict[str, float | str]:
    """Run one case in this process; its time and peak resident memory."""
    model = build(width)
    targets = [f"{i}.weight" for i in range(LAYERS)]
    started = time.perf_counter()
    if case.startswith("regrow"):
        import regrow

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the SpeedWarning of unstructured pruning
            masks = regrow.prune(model, 0.9, targets=targets, keep_dense=case.endswith("True"))
        sparsity = masks.sparsity()
    elif case.startswith("torch"):
        from torch.nn.utils import prune

        params = [(model[i], "weight") for i in range(LAYERS)]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.9)
        sparsity = sum(int((m.weight == 0).sum()) for m in model) / (LAYERS * width * width)
    else:
        sparsity = 0.0
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"seconds": seconds, "peak": peak, "sparsity": sparsity}


def run_case(case: str, size: str, limit_gib: float) -> dict[str, float | str]:
    code = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gib * GIB)}, {int(limit_gib * GIB)}))\n"
        "from benchmarks.memory import child\n"
        f"print('RESULT', json.dumps(child({case!r}, {WIDTHS[size]})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"error": error[:160]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--limit-gib", type=float, default=22.0)
    args = parser.parse_args()
    info = stamp()
    header = ["model", "parameters", "model GiB", "case", "peak GiB", "peak / model", "prune s", "sparsity"]
    rows = []
    for size in args.sizes:
        width = WIDTHS[size]
        params = LAYERS * width * width
        model_bytes = 4 * params
        for case in CASES:
            got = run_case(case, size, args.limit_gib)
            print(size, case, got, flush=True)
            if "error" in got:
                rows.append([size, params, f"{model_bytes / GIB:.2f}", case, "failed", "", "", got["error"]])
                continue
            peak = float(got["peak"])
            rows.append(
                [
                    size,
                    params,
                    f"{model_bytes / GIB:.2f}",
                    case,
                    f"{peak / GIB:.2f}",
                    f"{peak / model_bytes:.2f}",
                    f"{float(got['seconds']):.1f}" if case != "model only" else "",
                    f"{float(got['sparsity']):.4f}" if case != "model only" else "",
                ]
            )
    write_csv(RESULTS / "memory.csv", header, rows, info | {"limit_gib": args.limit_gib})
    text = (
        "# Peak memory of global unstructured pruning\n\n"
        + stamp_markdown(info)
        + f" Address-space limit per process: {args.limit_gib:g} GiB.\n\n"
        + "Twelve square Linear layers, float32, pruned together to 90 % by magnitude (one global ranking); each "
        "case in a fresh process, peak resident memory (`ru_maxrss`) of the whole process: interpreter, torch, "
        "model, masks and temporaries. `model only` is that process building the model and stopping. A failed "
        "case ran out of its address space; the last line of its error is shown.\n\n"
        + markdown_table(header, rows)
        + "\n"
    )
    (RESULTS / "memory.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
