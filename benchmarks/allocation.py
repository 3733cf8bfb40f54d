"""Per-group allocation for structural pruning: uniform against sensitivity and search, at the same MACs.

Run: python -m benchmarks.allocation [--seeds 3] [--macs 0.35] [--epochs 3] [--data DIR]

The dense reference ResNet-style CNN of benchmarks/structural.py (same training, same cache) is channel-
pruned to keep ``--macs`` of its MACs with three allocations of the per-group sparsities:

* uniform — every coupled group gives up the same share of its channels;
* sensitivity — regrow.allocate("sensitivity"): cuts go where the per-group sensitivity curves (each group
  pruned alone, loss on calibration images from the validation split) say they cost least per MAC;
* search — regrow.allocate("search"): evolutionary search from the sensitivity allocation, each candidate
  applied to a copy and scored by its calibration loss.

Each allocation is scaled to meet the MACs budget (within 2 %). Test accuracy is measured right after
pruning and after the same recovery budget (regrow.recover defaults: distillation).
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
    RESULTS,
    RunCache,
    fashion_mnist_or_exit,
    markdown_table,
    mean_std,
    reseed,
    stamp,
    stamp_markdown,
    write_csv,
)
from benchmarks.structural import dense_resnet
from regrow.measure.metrics import classification_metrics
from regrow.measure.sensitivity import calibration_batches

METHODS = ("uniform", "sensitivity", "search")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--macs", type=float, default=0.35, help="fraction of MACs to keep")
    parser.add_argument("--epochs", type=int, default=3, help="recovery epochs after pruning")
    parser.add_argument("--train-limit", type=int, default=12000)
    parser.add_argument("--calibration-batches", type=int, default=2, help="validation batches of 512 images")
    parser.add_argument("--candidates", type=int, default=12, help="allocations scored by the search")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    info = stamp()
    results: dict[tuple[str, str], list[float]] = {}
    achieved: dict[str, list[float]] = {}
    rows_csv = []
    dense_acc = []
    cache = RunCache(
        "allocation",
        {k: getattr(args, k) for k in ("macs", "epochs", "train_limit", "calibration_batches", "candidates", "data")},
        uses=("structural",),  # the dense baselines are trained there
    )
    for seed in range(args.seeds):
        data = fashion_mnist_or_exit(args.data, batch_size=128, seed=seed, train_limit=args.train_limit)
        dense = dense_resnet(seed, data, args.train_limit).eval()
        dense_acc.append(classification_metrics(dense, data.test)["accuracy"])
        started = time.perf_counter()
        sens = regrow.sensitivity(dense, data.val, pattern="channel", batches=args.calibration_batches, progress=False)
        print(
            f"seed {seed}: dense {100 * dense_acc[-1]:.2f}%, sensitivity in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        calib = calibration_batches(data.val, args.calibration_batches, torch.device("cpu"))

        def shrunk(allocation: dict[str, float], dense=dense, data=data) -> torch.nn.Module:
            model = copy.deepcopy(dense)
            masks = regrow.prune(model, pattern="channel", macs=args.macs, data=data.train, allocation=allocation)
            model.regrow_masks = masks  # type: ignore[attr-defined]
            return model

        def score(candidate: dict[str, float], calib=calib) -> float:
            try:
                return classification_metrics(shrunk(candidate), calib)["loss"]
            except regrow.RegrowError:
                return float("inf")

        for method in METHODS:

            def measure(method=method, seed=seed, dense=dense, data=data, sens=sens, score=score) -> dict:
                reseed(1000 + seed, data)
                started = time.perf_counter()
                plan = regrow.allocate(
                    method, sens, "macs", args.macs, score=score, candidates=args.candidates, seed=seed
                )
                model = shrunk(plan.per_target)
                masks = model.regrow_masks  # type: ignore[attr-defined]
                del model.regrow_masks  # type: ignore[attr-defined]
                pruned = classification_metrics(model, data.test)["accuracy"]
                regrow.recover(
                    model, masks, data.train, data.val, epochs=args.epochs, teacher=copy.deepcopy(dense), progress=False
                )
                return {
                    "pruned": pruned,
                    "recovered": classification_metrics(model, data.test)["accuracy"],
                    "macs_ratio": masks.structure.macs_ratio,
                    "per_target": plan.per_target,
                    "seconds": time.perf_counter() - started,
                }

            run = cache.get({"seed": seed, "allocation": method}, measure)
            pruned, recovered, macs_ratio = run["pruned"], run["recovered"], run["macs_ratio"]
            results.setdefault((method, "pruned"), []).append(pruned)
            results.setdefault((method, "recovered"), []).append(recovered)
            achieved.setdefault(method, []).append(macs_ratio)
            rows_csv.append(
                [
                    method,
                    seed,
                    f"{pruned:.4f}",
                    f"{recovered:.4f}",
                    f"{macs_ratio:.4f}",
                    " ".join(f"{k}={v:.3f}" for k, v in run["per_target"].items()),
                ]
            )
            print(
                f"  {method:12} MACs {macs_ratio:.3f}: pruned {100 * pruned:.2f}%, recovered "
                f"{100 * recovered:.2f}% ({run['seconds']:.0f} s)",
                flush=True,
            )

    write_csv(
        RESULTS / "allocation.csv",
        ["allocation", "seed", "test_acc_pruned", "test_acc_recovered", "macs_kept", "planned_sparsity"],
        rows_csv,
        info,
    )
    dense_mean, dense_std = mean_std(dense_acc)
    header = ["allocation", "MACs kept", "test acc right after pruning %", "test acc after recovery %"]
    rows = []
    for method in METHODS:
        macs_m, macs_s = mean_std(achieved[method])
        cells = []
        for stage in ("pruned", "recovered"):
            m, s = mean_std(results[(method, stage)])
            cells.append(f"{100 * m:.2f} ± {100 * s:.2f}")
        rows.append([method, f"{macs_m:.3f} ± {macs_s:.3f}", *cells])
    lines = [
        f"# Allocation: uniform, sensitivity and search at macs={args.macs:g}",
        "",
        stamp_markdown(info),
        "",
        "The reference ResNet-style CNN on Fashion-MNIST "
        f"(dense: **{100 * dense_mean:.2f} ± {100 * dense_std:.2f} %**, "
        f"the models of benchmarks/results/structural.md), channels removed to keep {args.macs:g} of the MACs. "
        f"Sensitivity: each coupled group pruned alone to 25/50/75/90/95 %, loss on "
        f"{512 * args.calibration_batches} validation images; search: {args.candidates} candidates. Recovery: "
        f"{args.epochs} epochs of regrow.recover defaults (distillation). Mean ± std over {args.seeds} seeds.",
        "",
        markdown_table(header, rows),
        "",
    ]
    if cache.note():
        lines += [cache.note(), ""]
    (RESULTS / "allocation.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
