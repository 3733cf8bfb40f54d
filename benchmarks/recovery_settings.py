"""Which settings of the best recovery method matter at 98 % sparsity? One setting changed at a time.

Run: python -m benchmarks.recovery_settings [--seeds 3] [--epochs 80] [--variants NAME ...] [--data DIR] [--jobs 2]

The recovery-methods study (benchmarks/results/recovery_methods.md) finds gradual pruning with distillation
best at 98 % sparsity on LeNet-300-100 / Fashion-MNIST. This study starts from exactly those settings and
changes one of them per row: the end of the sparsity ramp, the distillation weight and temperature, weight
decay, augmentation, averaging the weights (EMA), the split of the sparsity between the two pruned layers
and, in one row, the budget itself. Every other row gets the same 80 recovery epochs, and all use the same
cached dense models and data as that study. Test accuracy is on the official 10k test set; the validation
accuracy of the kept checkpoint (5k split of the training set, the only data a user could tune on) is
reported beside it. Numbers from another machine or torch version differ in the last digits from those of
recovery_methods.md, so compare rows within one results file.
Finished runs are kept in benchmarks/cache/runs/; ``--variants`` runs a subset and prints its table without
touching benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings
from typing import Any

import torch

import regrow
from benchmarks.common import (
    RESULTS,
    RunCache,
    dense_lenet,
    fashion_mnist_or_exit,
    markdown_table,
    mean_std,
    reseed,
    runs_text,
    stamp,
    stamp_markdown,
    write_csv,
)
from regrow.data.augment import AUGMENTS
from regrow.measure.metrics import classification_metrics

SPARSITY = 0.98
BASE: dict[str, Any] = {"end": 0.6, "every": 50}  # recovery_methods' gradual ramp; recover() defaults otherwise
VARIANTS: dict[str, dict[str, Any]] = {
    "as in recovery_methods": {},
    "ramp ends at 50 % of the epochs": {"end": 0.5},
    "ramp ends at 75 % of the epochs": {"end": 0.75},
    "distillation alpha 0.9 (was 0.5)": {"alpha": 0.9},
    "distillation temperature 4 (was 2)": {"temperature": 4.0},
    "weight decay 0 (was 5e-4)": {"weight_decay": 0.0},
    "augment: hflip": {"augment": "hflip"},
    "final layer sparsities in ERK proportion": {"erk": True},
    "weights averaged (EMA, decay 0.999)": {"ema": 0.999},
    "weights averaged (EMA, decay 0.9999)": {"ema": 0.9999},
    "twice the recovery epochs (160, was 80)": {"budget": 2},
}


def erk_allocation(model: torch.nn.Module, targets: list[str], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities whose densities are proportional to (fan_in + fan_out) / (fan_in * fan_out)
    (Erdős–Rényi, as in RigL, Evci et al. 2020), scaled so that the overall sparsity is ``sparsity``."""
    shapes = {n: model.get_parameter(n).shape for n in targets}
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    sizes = {n: s[0] * s[1] for n, s in shapes.items()}
    scale = (1 - sparsity) * sum(sizes.values()) / sum(raw[n] * sizes[n] for n in targets)
    return {n: 1 - scale * raw[n] for n in targets}


def measure_run(root: str | None, seed: int, variant: str, epochs: int) -> dict:
    """One run from scratch (data, the cached dense model, seeds): the same numbers in any process and order."""
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    torch.set_num_threads(1)
    data = fashion_mnist_or_exit(root, batch_size=128, seed=seed)
    dense = dense_lenet(seed, data)
    reseed(1000 + seed, data)
    started = time.perf_counter()
    model = copy.deepcopy(dense)
    options = {**BASE, **VARIANTS[variant]}
    epochs = round(epochs * options.pop("budget", 1))
    ramp = {"end": options.pop("end"), "every": options.pop("every")}
    allocation = None
    if options.pop("erk", False):
        targets = list(regrow.prune(copy.deepcopy(dense), 0.0).keys())
        allocation = erk_allocation(model, targets, SPARSITY)
    if "augment" in options:
        options["augment"] = AUGMENTS.get(options["augment"])
    masks = regrow.prune(model, 0.0, allocation=allocation)
    result = regrow.recover(
        model,
        masks,
        data.train,  # type: ignore[attr-defined]
        data.val,  # type: ignore[attr-defined]
        method="distill",
        epochs=epochs,
        patience=None,
        teacher=copy.deepcopy(dense),
        callbacks=[regrow.GradualPruning(final=SPARSITY, **ramp)],
        progress=False,
        **options,
    )
    assert abs(masks.sparsity() - SPARSITY) < 1e-3, (variant, masks.sparsity())
    kept = result.history[result.best_epoch]
    return {
        "accuracy": classification_metrics(model, data.test)["accuracy"],  # type: ignore[attr-defined]
        "val_accuracy": kept.val_accuracy,
        "train_accuracy": kept.train_accuracy,
        "layer_sparsity": {f: 1 - m.float().mean().item() for f, m in masks.items()},
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=80, help="recovery epoch budget, the same for every row")
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the rows, by name (default: all)")
    parser.add_argument("--data", default=None, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (same numbers)")
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    names = list(VARIANTS)
    if args.variants:
        unknown = [v for v in args.variants if v not in names]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {names}")
        names = [v for v in names if v in args.variants]
    info = stamp()
    dense_acc = []
    for seed in range(args.seeds):  # trains (or loads) each seed's dense baseline before any run needs it
        data = fashion_mnist_or_exit(args.data, batch_size=128, seed=seed)
        dense_acc.append(classification_metrics(dense_lenet(seed, data), data.test)["accuracy"])

    cache = RunCache("recovery_settings", {"epochs": args.epochs, "data": args.data, "sparsity": SPARSITY})
    runs = [(seed, name) for name in names for seed in range(args.seeds)]
    runs.sort(key=lambda run: -VARIANTS[run[1]].get("budget", 1))  # the longest first: the waves pack better
    done = cache.run(
        runs,
        ("seed", "variant"),
        measure_run,
        (args.data, args.epochs),
        args.jobs,
        lambda run, r: (
            f"seed {run[0]} {run[1]:36} val {100 * r['val_accuracy']:.2f}% test {100 * r['accuracy']:.2f}% "
            f"({r['seconds']:.0f} s)"
        ),
    )
    dense_mean, dense_std = mean_std(dense_acc)
    base = [done[(seed, names[0])]["accuracy"] for seed in range(args.seeds)]
    rows, csv_rows = [], []
    for name in names:
        res = [done[(seed, name)] for seed in range(args.seeds)]
        test = [r["accuracy"] for r in res]
        m, sd = mean_std(test)
        val_m, _ = mean_std([r["val_accuracy"] for r in res])
        train_m, _ = mean_std([r["train_accuracy"] for r in res])
        better = sum(t > b for t, b in zip(test, base, strict=True))
        layers = " / ".join(
            f"{100 * mean_std([r['layer_sparsity'][f] for r in res])[0]:.1f}" for f in res[0]["layer_sparsity"]
        )
        rows.append(
            [
                name,
                f"{100 * m:.2f} ± {100 * sd:.2f}",
                f"{100 * (m - dense_mean):+.2f}",
                f"{100 * val_m:.2f}",
                f"{100 * train_m:.2f}",
                layers,
                "—" if name == names[0] else f"{better} of {args.seeds}",
            ]
        )
        csv_rows += [
            [name, seed, f"{r['accuracy']:.4f}", f"{r['val_accuracy']:.4f}", f"{r['train_accuracy']:.4f}"]
            for seed, r in enumerate(res)
        ]
    header = [
        "gradual + distill at 0.98, one change",
        "test acc % (mean ± std)",
        "gap to dense",
        "val acc % of the kept epoch",
        "train acc % (running, kept epoch)",
        "layer sparsity % (fc1 / fc2)",
        f"seeds above the first row (of {args.seeds})",
    ]
    best = max(names, key=lambda n: mean_std([done[(s, n)]["val_accuracy"] for s in range(args.seeds)])[0])
    lines = [
        "# Recovery settings: gradual + distill at 98 % sparsity, one change at a time",
        "",
        stamp_markdown(info),
        "",
        f"LeNet-300-100 on Fashion-MNIST, the dense models and data of `recovery_methods.md` (dense "
        f"**{100 * dense_mean:.2f} ± {100 * dense_std:.2f} %**, {args.seeds} seeds). Every row recovers from the "
        f"dense model with gradual pruning to 98 % and distillation from it for {args.epochs} epochs (one row: "
        f"{2 * args.epochs}), the best "
        "validation epoch kept; the first row uses the settings of `recovery_methods.md` (ramp over the first "
        "60 % of the steps, masks every 50 steps, alpha 0.5, T 2, AdamW lr 1e-3, weight decay 5e-4) and each "
        f"other row changes one of them. Runs: {runs_text(args.jobs)}, 1 torch thread per run.",
        "",
        markdown_table(header, rows),
        "",
        f"Highest mean validation accuracy (the choice a user could make without the test set): **{best}**, "
        f"test {100 * mean_std([done[(s, best)]['accuracy'] for s in range(args.seeds)])[0]:.2f} %.",
        "",
        "Per-seed numbers: `recovery_settings.csv`.",
        "",
    ]
    if cache.note():
        lines += [cache.note(), ""]
    print("\n".join(lines))
    if args.variants:  # a partial study never replaces the committed results
        print("(a subset of the rows: benchmarks/results/ left unchanged)")
        return
    write_csv(
        RESULTS / "recovery_settings.csv",
        ["variant", "seed", "test_accuracy", "val_accuracy", "train_accuracy"],
        csv_rows,
        info,
    )
    (RESULTS / "recovery_settings.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
