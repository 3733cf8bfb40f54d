"""Structural pruning on the reference models: achieved MACs, equivalence, save/load, measured CPU speed-up.

Run: python -m benchmarks.structural_speed   (a few minutes on 2 CPU cores)

For each case the dense model and the shrunk model are timed side by side in this process, alternating one
forward pass of each per round, and the ratio of the medians is reported. Weights are freshly initialised:
dense-kernel latency does not depend on the values, but which channels a prune keeps does: trained models
are measured in benchmarks/structural.py, with their accuracy.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import regrow
from benchmarks.common import RESULTS, markdown_table, stamp, stamp_markdown, write_csv
from regrow.measure.latency import compare_latency
from regrow.models import MODELS

CASES = [
    # (model, kwargs, pattern, budget, round_to)
    ("resnet", {}, "channel", {"macs": 0.5}, None),
    ("resnet", {}, "channel", {"macs": 0.25}, None),
    ("resnet", {}, "channel", {"macs": 0.5}, 1),
    ("resnet", {}, "channel", {"macs": 0.5}, 8),
    ("vit", {}, "channel", {"macs": 0.5}, None),
    ("vit", {}, "head", {"sparsity": 0.5}, None),
]


def trained_rounding(rounds: int, x64: torch.Tensor) -> list[list[str]]:
    """The rounding question on trained weights: the seed-0 ResNet of benchmarks/structural.py (trained once and
    cached), shrunk to ``macs=0.5`` with each rounding and timed against the dense model. Empty without data."""
    from regrow.data.fashion_mnist import available, fashion_mnist

    if not available(None):
        print("Fashion-MNIST not found: the trained-weights rounding comparison is skipped.")
        return []
    from benchmarks.structural import dense_resnet

    data = fashion_mnist(batch_size=128, seed=0, train_limit=12000)
    dense = dense_resnet(0, data, 12000).eval()
    rows = []
    for round_to in (1, 8, None):
        model = copy.deepcopy(dense)
        report = regrow.prune(model, pattern="channel", macs=0.5, data=data.train, round_to=round_to).structure
        model.eval()
        row = ["auto" if round_to is None else round_to, f"{report.macs_ratio:.4f}"]
        for batch in (x64, x64[:1]):
            before, after = compare_latency(dense, model, batch, rounds=rounds)
            row.append(f"{before.median_ms / after.median_ms:.2f}x")
        print("trained", " | ".join(str(c) for c in row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="interleaved forward passes per model and batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = stamp()
    header = [
        "model",
        "pattern",
        "budget",
        "round_to",
        "MACs kept",
        "params kept",
        "equivalence max diff",
        "reload identical",
        "batch 64 dense ms",
        "batch 64 pruned ms",
        "batch 64 speed-up",
        "batch 1 dense ms",
        "batch 1 pruned ms",
        "batch 1 speed-up",
    ]
    rows = []
    shrunk = {}
    for name, kwargs, pattern, budget, round_to in CASES:
        torch.manual_seed(args.seed)
        model = MODELS.get(name)(**kwargs).eval()
        dense = copy.deepcopy(model)
        x64 = torch.randn(64, 1, 28, 28)
        masks = regrow.prune(model, pattern=pattern, example_inputs=x64[:8], round_to=round_to, **budget)
        report = masks.structure
        with tempfile.TemporaryDirectory() as tmp:
            regrow.save(model, tmp)
            torch.manual_seed(args.seed + 1)
            again = regrow.load(tmp, lambda name=name, kwargs=kwargs: MODELS.get(name)(**kwargs)).eval()
            with torch.no_grad():
                identical = torch.equal(again(x64), model(x64))
        timings = []
        for batch in (x64, x64[:1]):
            before, after = compare_latency(dense, model, batch, rounds=args.rounds)
            timings += [
                f"{before.median_ms:.2f}",
                f"{after.median_ms:.2f}",
                f"{before.median_ms / after.median_ms:.2f}x",
            ]
        row = [
            name,
            pattern,
            ", ".join(f"{k}={v}" for k, v in budget.items()),
            "auto" if round_to is None else round_to,
            f"{report.macs_ratio:.4f}",
            f"{report.params_ratio:.4f}",
            f"{report.equivalence.max_abs_diff:.2e}",
            "yes" if identical else "NO",
            *timings,
        ]
        print(" | ".join(str(c) for c in row), flush=True)
        rows.append(row)
        shrunk[(name, pattern, tuple(budget.items()), round_to)] = model
    # The rounding question asked directly: the shrunk ResNets at the same budget, timed against each other.
    auto = regrow.structural.auto_round_to(torch.device("cpu"))
    even = shrunk[("resnet", "channel", (("macs", 0.5),), None)]
    rounding_header = ["batch", "other round_to", "other ms", f"auto ({auto}) ms", "auto faster by"]
    rounding_rows = []
    for other in (1, 8):
        for batch in (x64, x64[:1]):
            a, b = compare_latency(
                shrunk[("resnet", "channel", (("macs", 0.5),), other)], even, batch, rounds=args.rounds
            )
            rounding_rows.append(
                [len(batch), other, f"{a.median_ms:.2f}", f"{b.median_ms:.2f}", f"{a.median_ms / b.median_ms:.2f}x"]
            )
            print("rounding", " | ".join(str(c) for c in rounding_rows[-1]), flush=True)
    trained = trained_rounding(args.rounds, x64)
    write_csv(RESULTS / "structural_speed.csv", header, rows, info)
    text = [
        "# Structural pruning: achieved budget, equivalence, reload, measured CPU speed-up",
        "",
        stamp_markdown(info),
        "",
        "Reference models with their default sizes (ResNet-style CNN, widths 32/64/128; ViT-style encoder, "
        "width 64, 4 blocks, 4 heads), random initial weights (dense-kernel latency does not depend on them). "
        "Latency: median of interleaved forward passes of the dense and the shrunk model in one process. "
        f"`round_to` auto = kept widths of groups with at least 32 channels rounded to multiples of {auto} on this "
        "CPU (16 with AVX-512, 8 otherwise: the channel block of oneDNN's kernels).",
        "",
        markdown_table(header, rows),
        "",
        "## Rounding kept widths: ResNets shrunk to `macs=0.5`, timed against each other",
        "",
        f"Same budget, kept widths rounded to multiples of {auto} (auto), "
        + ("of 8, " if auto != 8 else "of 8 (the same as auto on this CPU), ")
        + "or left as the search chose them (1); each pair of shrunk models alternates in one measurement, so the "
        "ratio does not depend on a dense reference.",
        "",
        markdown_table(rounding_header, rounding_rows),
        "",
    ]
    if trained:
        text += [
            "## Rounding on trained weights",
            "",
            "Which channels a prune keeps depends on the weights, so the widths differ from the table above: the "
            "seed-0 ResNet of `structural.md` (trained on Fashion-MNIST), shrunk to `macs=0.5` with each "
            "rounding, each timed against the dense model (interleaved, median).",
            "",
            markdown_table(["round_to", "MACs kept", "batch 64 speed-up", "batch 1 speed-up"], trained),
            "",
        ]
    (RESULTS / "structural_speed.md").write_text("\n".join(text), encoding="utf-8")


if __name__ == "__main__":
    main()
