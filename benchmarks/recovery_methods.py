"""Recovery methods side by side: LeNet-300-100 on Fashion-MNIST at 95 % and 98 % sparsity.

Run: python -m benchmarks.recovery_methods [--seeds 3] [--epochs 40] [--data DIR]

Each seed trains the dense LeNet-300-100 (784-300-100-10, Han et al. 2015) once (cached under
benchmarks/cache/), prunes it with global magnitude (final classifier dense), and recovers it with each
method under the same epoch budget. Test accuracy is on the official 10k test set, which recovery never
sees; checkpoints are chosen on a 5k validation split of the training set.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import torch

import regrow
from benchmarks.common import (
    LENET_DENSE,
    RESULTS,
    dense_lenet,
    fashion_mnist_or_exit,
    markdown_table,
    mean_std,
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40, help="recovery epoch budget, the same for every method")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.98])
    parser.add_argument("--data", default=None, help="folder with the four Fashion-MNIST IDX files")
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    info = stamp()
    results: dict[tuple[str, float], list[float]] = {}
    dense_acc = []
    for seed in range(args.seeds):
        data = fashion_mnist_or_exit(args.data, batch_size=128, seed=seed)

        dense = dense_lenet(seed, data)
        acc = classification_metrics(dense, data.test)["accuracy"]
        dense_acc.append(acc)
        print(f"seed {seed}: dense test accuracy {100 * acc:.2f}%", flush=True)
        for sparsity in args.sparsities:
            for name, options in methods(args.epochs).items():
                torch.manual_seed(1000 + seed)
                model = copy.deepcopy(dense)
                options = dict(options)
                callbacks = []
                if options.pop("gradual", False):
                    masks = regrow.prune(model, 0.0)
                    callbacks = [regrow.GradualPruning(final=sparsity, every=50, end=0.6)]
                else:
                    masks = regrow.prune(model, sparsity)
                started = time.perf_counter()
                regrow.recover(
                    model,
                    masks,
                    data.train,
                    data.val,
                    epochs=args.epochs,
                    patience=None,
                    teacher=copy.deepcopy(dense),
                    callbacks=callbacks,
                    progress=False,
                    **options,
                )
                test = classification_metrics(model, data.test)["accuracy"]
                assert abs(masks.sparsity() - sparsity) < 1e-3
                results.setdefault((name, sparsity), []).append(test)
                print(
                    f"seed {seed} sparsity {sparsity} {name:18} test {100 * test:.2f}% "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )

    dense_mean, dense_std = mean_std(dense_acc)
    header = [
        "method",
        *[f"sparsity {s:g}: test acc % (mean ± std)" for s in args.sparsities],
        *[f"gap to dense at {s:g}" for s in args.sparsities],
    ]
    rows = []
    for name in methods(args.epochs):
        cells, gaps = [], []
        for s in args.sparsities:
            m, sd = mean_std(results[(name, s)])
            cells.append(f"{100 * m:.2f} ± {100 * sd:.2f}")
            gaps.append(f"{100 * (m - dense_mean):+.2f}")
        rows.append([name, *cells, *gaps])
    csv_rows = [[name, s, seed, f"{acc:.4f}"] for (name, s), accs in results.items() for seed, acc in enumerate(accs)]
    write_csv(RESULTS / "recovery_methods.csv", ["method", "sparsity", "seed", "test_accuracy"], csv_rows, info)
    best = {s: max(methods(args.epochs), key=lambda n, s=s: mean_std(results[(n, s)])[0]) for s in args.sparsities}
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
        "updates masks every 100 steps.",
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
    (RESULTS / "recovery_methods.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
