"""Unstructured pruning of LeNet-300-100 on Fashion-MNIST: regrow against what a user would otherwise do.

Run: python -m benchmarks.unstructured [--seeds 3] [--epochs 40] [--data DIR] [--jobs 2]

For each seed the dense LeNet-300-100 (784-300-100-10, Han et al. 2015) is trained once (cached) and
pruned at each sparsity, over the first two layers (the classifier stays dense in every variant):

(a) one-shot global magnitude pruning, no recovery;
(b) ``torch.nn.utils.prune.global_unstructured`` (L1) followed by plain fine-tuning: SGD, momentum 0.9,
    lr 0.01, the final epoch's model;
(c) regrow with its defaults (``regrow.prune`` + ``regrow.recover``: distillation, AdamW, cosine), the
    same with ``augment="shift"`` (random whole-pixel shifts of the training images), and
    with its best recovery method from benchmarks/results/recovery_methods.md (gradual pruning with
    distillation), under the same epoch budget.

Test accuracy on the official 10k test set; mean and standard deviation over seeds; a plot of test accuracy
against sparsity with the dense model's accuracy as a line.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

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
from regrow.measure.metrics import classification_metrics

SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
VARIANTS = [
    "(a) one-shot, no recovery",
    "(b) torch prune + SGD fine-tuning",
    "(c) regrow default (distill)",
    "(c) regrow default + shift augment",
    "(c) regrow best (gradual + distill)",
]


def torch_prune_and_finetune(model: nn.Module, sparsity: float, data: object, epochs: int) -> None:
    layers = [(model[1], "weight"), (model[3], "weight")]  # LeNet-300-100: Flatten, fc1, ReLU, fc2, ReLU, fc3
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in data.train:  # type: ignore[attr-defined]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for module, name in layers:
        torch_prune.remove(module, name)
    model.eval()


def run_variant(variant: str, dense: nn.Module, sparsity: float, data: object, epochs: int) -> tuple[nn.Module, float]:
    model = copy.deepcopy(dense)
    if variant.startswith("(a)"):
        masks = regrow.prune(model, sparsity)
    elif variant.startswith("(b)"):
        torch_prune_and_finetune(model, sparsity, data, epochs)
        return model, float((torch.cat([model[1].weight.flatten(), model[3].weight.flatten()]) == 0).float().mean())
    elif "shift augment" in variant:  # before the plain default branch, whose substring it also contains
        masks = regrow.prune(model, sparsity)
        regrow.recover(model, masks, data.train, data.val, epochs=epochs, augment="shift", progress=False)  # type: ignore[attr-defined]
    elif "default" in variant:
        masks = regrow.prune(model, sparsity)
        regrow.recover(model, masks, data.train, data.val, epochs=epochs, progress=False)  # type: ignore[attr-defined]
    else:
        masks = regrow.prune(model, 0.0)
        regrow.recover(
            model,
            masks,
            data.train,
            data.val,
            epochs=epochs,
            patience=None,
            progress=False,  # type: ignore[attr-defined]
            callbacks=[regrow.GradualPruning(final=sparsity, every=50, end=0.6)],
        )
    return model, masks.sparsity()


def measure_run(root: str | None, seed: int, sparsity: float, variant: str, epochs: int) -> dict:
    """One run from scratch: data, the cached dense model, seeds. The same numbers in any process and order."""
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    data = fashion_mnist_or_exit(root, batch_size=128, seed=seed)
    dense = dense_lenet(seed, data)
    reseed(1000 + seed, data)
    started = time.perf_counter()
    model, achieved = run_variant(variant, dense, sparsity, data, epochs)
    acc = classification_metrics(model, data.test)["accuracy"]
    return {"accuracy": acc, "achieved": achieved, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40, help="recovery epoch budget of (b) and (c)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--data", default=None, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (same numbers)")
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    info = stamp()
    dense_acc = []
    for seed in range(args.seeds):  # trains (or loads) each seed's dense baseline before any run needs it
        data = fashion_mnist_or_exit(args.data, batch_size=128, seed=seed)
        dense_acc.append(classification_metrics(dense_lenet(seed, data), data.test)["accuracy"])
        print(f"seed {seed}: dense {100 * dense_acc[-1]:.2f}%", flush=True)

    cache = RunCache("unstructured", {"epochs": args.epochs, "data": args.data})
    runs = [(seed, s, v) for seed in range(args.seeds) for s in args.sparsities for v in VARIANTS]
    done = cache.run(
        runs,
        ("seed", "sparsity", "variant"),
        measure_run,
        (args.data, args.epochs),
        args.jobs,
        lambda run, r: (
            f"seed {run[0]} sparsity {run[1]:g} {run[2]:38} {100 * r['accuracy']:.2f}% ({r['seconds']:.0f} s)"
        ),
    )

    results: dict[tuple[str, float], list[float]] = {}
    csv_rows = []
    for run in runs:
        seed, sparsity, variant = run
        acc, achieved = done[run]["accuracy"], done[run]["achieved"]  # type: ignore[index]
        assert abs(achieved - sparsity) < 2e-3, (variant, achieved)
        results.setdefault((variant, sparsity), []).append(acc)
        csv_rows.append([variant, sparsity, seed, f"{acc:.4f}", f"{achieved:.4f}"])

    dense_mean, dense_std = mean_std(dense_acc)
    write_csv(
        RESULTS / "unstructured.csv",
        ["variant", "sparsity", "seed", "test_accuracy", "achieved_sparsity"],
        csv_rows,
        info,
    )
    header = ["sparsity", *VARIANTS]
    rows = [
        [
            f"{s:g}",
            *[f"{100 * mean_std(results[(v, s)])[0]:.2f} ± {100 * mean_std(results[(v, s)])[1]:.2f}" for v in VARIANTS],
        ]
        for s in args.sparsities
    ]
    plot(results, args.sparsities, dense_mean, dense_std)
    lines = [
        "# Unstructured pruning: LeNet-300-100 on Fashion-MNIST",
        "",
        stamp_markdown(info),
        "",
        f"Dense LeNet-300-100: **{100 * dense_mean:.2f} ± {100 * dense_std:.2f} %** test accuracy ({args.seeds} seeds; "
        "AdamW, lr 0.002, cosine, 30 epochs; 55k train / 5k validation / 10k test). Test accuracy in % (mean ± "
        f"std over {args.seeds} seeds) after pruning the first two layers to each sparsity; (b) and (c) get the "
        f"same budget of **{args.epochs} epochs**. (b) keeps its final model; regrow keeps its best validation epoch. "
        f"Runs: {runs_text(args.jobs)}.",
        "",
        markdown_table(header, rows),
        "",
        "![test accuracy against sparsity](unstructured.png)",
        "",
    ]
    if cache.note():
        lines += [cache.note(), ""]
    if 0.98 in args.sparsities:
        best = max(mean_std(results[(v, 0.98)])[0] for v in VARIANTS[2:])
        torch_b = mean_std(results[(VARIANTS[1], 0.98)])[0]
        lines += [
            f"At sparsity 0.98 the best regrow variant is {100 * (best - dense_mean):+.2f} points from dense and "
            f"{100 * (best - torch_b):+.2f} points from (b).",
            "",
        ]
    (RESULTS / "unstructured.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


def plot(
    results: dict[tuple[str, float], list[float]], sparsities: list[float], dense_mean: float, dense_std: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.axhline(100 * dense_mean, color="black", linestyle=":", label=f"dense ({100 * dense_mean:.2f}%)")
    for variant in VARIANTS:
        means = [100 * mean_std(results[(variant, s)])[0] for s in sparsities]
        stds = [100 * mean_std(results[(variant, s)])[1] for s in sparsities]
        ax.errorbar(sparsities, means, yerr=stds, marker="o", capsize=3, label=variant)
    ax.set_xlabel("sparsity of the first two layers")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0, min(100 * dense_mean - 15, ax.get_ylim()[0])), 100 * dense_mean + 2)
    ax.set_title("LeNet-300-100 on Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(RESULTS / "unstructured.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
