"""Peak memory and time of channel pruning a 1.1B-parameter Llama on the CPU.

Run: python -m benchmarks.structural_memory [--layers 22] [--repeats 2]

The model is transformers' ``LlamaForCausalLM`` at TinyLlama-1.1B's widths (hidden 2,048, FFN 5,632, vocabulary
32,000, 22 layers; 32 heads of 64, 8 key/value heads), random weights (seed 0), 4.18 GiB in float32. Each run is
a fresh Python process that builds the model, then calls
``regrow.prune(model, pattern="channel", sparsity=0.25, scope="layer", keep_dense=False, example_inputs=ids)``
with 16 token ids: tracing, the groups, the probes, the budget search, the surgery and the equivalence check,
all on the CPU. Reported per run: the call's wall time, the MACs kept, whether the check passed, and the peak
resident memory of the process (``ru_maxrss``: interpreter, torch, model and every copy) in GiB and as a
multiple of the model's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

from benchmarks.common import RESULTS, markdown_table, stamp, stamp_markdown


def child(layers: int) -> dict:
    """Build the model and prune it in this process; the call's time, the result and the process's peak."""
    import torch
    import transformers

    import regrow

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    report = regrow.prune(
        model, pattern="channel", sparsity=0.25, scope="layer", keep_dense=False, example_inputs=ids
    ).structure
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return {
        "seconds": round(seconds, 1), "macs_kept": round(report.macs_ratio, 4), "check": report.equivalence.passed,
        "model_gib": round(size, 2), "peak_gib": round(peak, 2), "peak_x_model": round(peak / size, 2),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    info = stamp()
    rows = []
    for run in range(args.repeats):
        code = f"import json; from benchmarks.structural_memory import child; print(json.dumps(child({args.layers})))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800)
        rows.append({"run": run + 1, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    keys = ["run", "seconds", "macs_kept", "check", "model_gib", "peak_gib", "peak_x_model"]
    table = markdown_table(keys, [[r[k] for k in keys] for r in rows])
    title = f"# Channel pruning a Llama of TinyLlama-1.1B's widths ({args.layers} layers) on the CPU: peak memory"
    (RESULTS / "structural_memory.md").write_text(f"{title}\n\n{stamp_markdown(info)}\n\n{table}\n")
    (RESULTS / "structural_memory.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
