"""Recovery methods side by side: LeNet-300-100 on Fashion-MNIST at 95 % and 98 % sparsity.

Run: python -m benchmarks.recovery_methods [--seeds 3] [--epochs 80] [--methods NAME ...] [--data DIR] [--jobs 2]

Each seed trains the dense LeNet-300-100 (784-300-100-10, Han et al. 2015) once (cached under
benchmarks/cache/), prunes it with global magnitude (final classifier dense), and recovers it with each
method under the same epoch budget. Test accuracy is on the official 10k test set, which recovery never
sees; checkpoints are chosen on a 5k validation split of the training set. Finished runs are kept in
benchmarks/cache/runs/ (see ``RunCache``), so an interrupted study resumes; ``--methods`` runs a subset and
prints its table without touching benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import torch
from torch import nn

import regrow
from benchmarks.common import (
    LENET_DENSE,
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
from regrow.measure.metrics import classification_metrics

DENSE = LENET_DENSE  # the original training: AdamW, cosine, 5 % warm-up


def methods(budget: int) -> dict[str, dict]:
    original = {"lr": DENSE["lr"], "epochs": DENSE["epochs"], "schedule": "cosine", "warmup": 0.05}
    return {
        "fine-tune": {"method": "finetune"},
        "distill": {"method": "distill"},
        "LR rewinding": {"method": "finetune", "rewind": "lr", "original": original},
        "one-cycle": {"method": "finetune", "lr_schedule": "one_cycle", "original": original},
        "gradual": {"method": "finetune", "gradual": True},
        "gradual + distill": {"method": "distill", "gradual": True},
        "RigL": {"method": "rigl", "dynamic": {"update_every": 100}},
        "RigL + distill": {"method": "rigl", "distill": True, "dynamic": {"update_every": 100}},
        # the teacher labels every shifted image too: more of its function is matched (Beyer et al. 2022)
        "gradual + distill + shift": {"method": "distill", "gradual": True, "augment": "shift"},
    }


def run_method(name: str, dense: nn.Module, sparsity: float, data: object, epochs: int) -> nn.Module:
    model = copy.deepcopy(dense)
    options = dict(methods(epochs)[name])
    callbacks = []
    if options.pop("gradual", False):
        masks = regrow.prune(model, 0.0)
        callbacks = [regrow.GradualPruning(final=sparsity, every=50, end=0.6)]
    else:
        masks = regrow.prune(model, sparsity)
    regrow.recover(
        model,
        masks,
        data.train,  # type: ignore[attr-defined]
        data.val,  # type: ignore[attr-defined]
        epochs=epochs,
        patience=None,
        teacher=copy.deepcopy(dense),
        callbacks=callbacks,
        progress=False,
        **options,
    )
    assert abs(masks.sparsity() - sparsity) < 1e-3, (name, masks.sparsity())
    return model


def measure_run(root: str | None, seed: int, sparsity: float, name: str, epochs: int) -> dict:
    """One run from scratch: data, the cached dense model, seeds. The same numbers in any process and order."""
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    torch.set_num_threads(1)
    data = fashion_mnist_or_exit(root, batch_size=128, seed=seed)
    dense = dense_lenet(seed, data)
    reseed(1000 + seed, data)
    started = time.perf_counter()
    model = run_method(name, dense, sparsity, data, epochs)
    acc = classification_metrics(model, data.test)["accuracy"]
    return {"accuracy": acc, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=80, help="recovery epoch budget, the same for every method")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.98])
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods, by name (default: all)")
    parser.add_argument("--data", default=None, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (same numbers)")
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    names = list(methods(args.epochs))
    if args.methods:
        unknown = [m for m in args.methods if m not in names]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {names}")
        names = [m for m in names if m in args.methods]
    info = stamp()
    dense_acc = []
    for seed in range(args.seeds):  # trains (or loads) each seed's dense baseline before any run needs it
        data = fashion_mnist_or_exit(args.data, batch_size=128, seed=seed)
        dense_acc.append(classification_metrics(dense_lenet(seed, data), data.test)["accuracy"])
        print(f"seed {seed}: dense test accuracy {100 * dense_acc[-1]:.2f}%", flush=True)

    cache = RunCache("recovery_methods", {"epochs": args.epochs, "data": args.data})
    runs = [(seed, s, name) for seed in range(args.seeds) for s in args.sparsities for name in names]
    done = cache.run(
        runs,
        ("seed", "sparsity", "method"),
        measure_run,
        (args.data, args.epochs),
        args.jobs,
        lambda run, r: (
            f"seed {run[0]} sparsity {run[1]:g} {run[2]:18} test {100 * r['accuracy']:.2f}% ({r['seconds']:.0f} s)"
        ),
    )
    results: dict[tuple[str, float], list[float]] = {}
    for seed, sparsity, name in runs:
        results.setdefault((name, sparsity), []).append(done[(seed, sparsity, name)]["accuracy"])  # type: ignore[index]

    dense_mean, dense_std = mean_std(dense_acc)
    header = [
        "method",
        *[f"sparsity {s:g}: test acc % (mean ± std)" for s in args.sparsities],
        *[f"gap to dense at {s:g}" for s in args.sparsities],
    ]
    rows = []
    for name in names:
        cells, gaps = [], []
        for s in args.sparsities:
            m, sd = mean_std(results[(name, s)])
            cells.append(f"{100 * m:.2f} ± {100 * sd:.2f}")
            gaps.append(f"{100 * (m - dense_mean):+.2f}")
        rows.append([name, *cells, *gaps])
    csv_rows = [[name, s, seed, f"{acc:.4f}"] for (name, s), accs in results.items() for seed, acc in enumerate(accs)]
    rewinding = (
        f"all of it, {args.epochs / DENSE['epochs']:.2f}x slower so that it fills the {args.epochs} recovery "
        "epochs and ends where the original ended"
        if args.epochs > DENSE["epochs"]
        else f"its last {args.epochs} epochs"
    )
    best = {s: max(names, key=lambda n, s=s: mean_std(results[(n, s)])[0]) for s in args.sparsities}
    lines = [
        "# Recovery methods: LeNet-300-100 on Fashion-MNIST",
        "",
        stamp_markdown(info),
        "",
        f"Dense LeNet-300-100 (784-300-100-10): **{100 * dense_mean:.2f} ± {100 * dense_std:.2f} %** test accuracy "
        f"({args.seeds} seeds; AdamW, lr {DENSE['lr']}, cosine, {DENSE['epochs']} epochs, 55k train / 5k val / "
        "10k test). Pruning: global magnitude over the first two layers (the classifier stays dense). Every "
        f"method gets the same budget of **{args.epochs} recovery epochs** (AdamW, lr 1e-3 unless the method sets "
        "it, weight decay 5e-4, no early stopping; the best validation epoch is kept). Gradual ramps the "
        "sparsity from 0 during the first 60 % of those epochs (cubic, masks updated every 50 steps); RigL "
        "updates masks every 100 steps; '+ shift' moves each training image by a random whole number of "
        "pixels in [-1, 1] per axis (`augment: shift`; the teacher sees the same shifted images). LR rewinding "
        "replays the original schedule (5 % warm-up to lr "
        f"{DENSE['lr']}, cosine over {DENSE['epochs']} epochs): {rewinding}. One-cycle warms up to that peak "
        f"over 30 % of the steps and anneals. Runs: {runs_text(args.jobs)}, 1 torch thread each.",
        "",
        markdown_table(header, rows),
        "",
        *[
            f"Best at sparsity {s:g}: **{best[s]}**, {100 * mean_std(results[(best[s], s)])[0]:.2f} % "
            f"({100 * (mean_std(results[(best[s], s)])[0] - dense_mean):+.2f} points against dense)."
            for s in args.sparsities
        ],
        "",
        "Per-seed numbers: `recovery_methods.csv`.",
        "",
    ]
    if cache.note():
        lines += [cache.note(), ""]
    print("\n".join(lines))
    if args.methods:  # a partial study never replaces the committed results
        print("(a subset of the methods: benchmarks/results/ left unchanged)")
        return
    write_csv(RESULTS / "recovery_methods.csv", ["method", "sparsity", "seed", "test_accuracy"], csv_rows, info)
    (RESULTS / "recovery_methods.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
