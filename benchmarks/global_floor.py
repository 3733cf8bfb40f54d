"""Global magnitude ranking with a per-target floor: how much each target must keep at high sparsity.

Run: python -m benchmarks.global_floor [--seeds 2] [--sparsities 0.9 0.95 0.98] [--epochs 10]

A global ranking of unstructured weights lets one target lose far more than the others, up to all of its
weights. regrow caps the share removed from each target (``PruneSpec.global_cap``); this study chooses the
default cap (0.5 since this study). Rules compared, as ``prune.max_sparsity`` given to the run:

* ``no cap`` — 0.999999: one weight left in a target at most, the global ranking as it was before the cap;
* ``floor 0`` — 0.99 (every target keeps 1 %);
* ``floor 0.25`` / ``floor 0.5`` — ``min(0.99, 1 - floor * (1 - sparsity))``: every target keeps at least a
  quarter / half of the overall density;
* ``layer`` — scope layer (every target at the overall sparsity), for reference.

Two shipped recipes on scikit-learn's digits (no download): ``demo`` (a CNN, distillation) and
``digits_rewind_lr`` (a 64-256-256-10 MLP, fine-tuning with the learning rate rewound, the recipe whose
global ranking emptied a layer). Each run trains its baseline as the recipe says, prunes at the sparsity,
and recovers for ``--epochs`` epochs; reported: test accuracy after recovery, and the smallest share of
weights any target kept after pruning. Mean and standard deviation over seeds (``seed`` of the recipe).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings

from benchmarks.common import RESULTS, markdown_table, mean_std, stamp, stamp_markdown, write_csv

RULES = ("no cap", "floor 0", "floor 0.25", "floor 0.5", "layer")
RECIPES = ("demo", "digits_rewind_lr")


def overrides(rule: str, sparsity: float, epochs: int, seed: int) -> list[str]:
    out = [f"prune.sparsity={sparsity}", f"recover.epochs={epochs}", "evaluate.latency=false", f"seed={seed}"]
    if rule == "layer":
        return [*out, "prune.scope=layer"]
    if rule == "no cap":
        return [*out, "prune.max_sparsity=0.999999"]
    floor = float(rule.split()[1])
    return [*out, f"prune.max_sparsity={min(0.99, 1 - floor * (1 - sparsity)) if floor else 0.99:.6f}"]


def one_run(recipe: str, rule: str, sparsity: float, epochs: int, seed: int) -> tuple[float, float]:
    import regrow

    with tempfile.TemporaryDirectory() as tmp:
        report = regrow.run(
            recipe, overrides=overrides(rule, sparsity, epochs, seed), out_dir=f"{tmp}/o", progress=False
        )
    per_target = report.snapshots["pruned"].per_target_sparsity or {}
    kept = 1.0 - max(per_target.values(), default=0.0)
    return report.snapshots["recovered"].accuracy, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--epochs", type=int, default=10, help="recovery epochs")
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    info = stamp()
    rows, csv_rows = [], []
    for recipe in RECIPES:
        for sparsity in args.sparsities:
            for rule in RULES:
                runs = [one_run(recipe, rule, sparsity, args.epochs, seed) for seed in range(args.seeds)]
                acc, acc_sd = mean_std([100 * a for a, _ in runs])
                kept = min(k for _, k in runs)
                rows.append([recipe, sparsity, rule, f"{acc:.2f} ± {acc_sd:.2f}", f"{100 * kept:.2f}"])
                csv_rows += [[recipe, sparsity, rule, seed, a, k] for seed, (a, k) in enumerate(runs)]
                print(*rows[-1], sep=" | ", flush=True)
    header = ["recipe", "sparsity", "rule", "test accuracy % after recovery", "least kept by a target %"]
    write_csv(
        RESULTS / "global_floor.csv", ["recipe", "sparsity", "rule", "seed", "accuracy", "least_kept"], csv_rows, info
    )
    text = (
        "# Global ranking: the per-target floor\n\n"
        + stamp_markdown(info)
        + f"\n\n{args.seeds} seeds, {args.epochs} recovery epochs; the recipes' own baseline training.\n\n"
        + markdown_table(header, rows)
        + "\n"
    )
    (RESULTS / "global_floor.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
