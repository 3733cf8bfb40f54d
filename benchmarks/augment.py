"""Augmentation during recovery on a small image set: the digits demo with and without random shifts.

Run: python -m benchmarks.augment [--seeds 10]

The built-in demo recipe (digits CNN, 1,221 training images, 90 % global magnitude pruning) is run whole
for every seed, once per recovery arm: fine-tuning or distillation, each with ``recover.augment`` none or
shift. The baseline training (with shifts, as the recipe says) is the same across the arms of a seed, so
the arms differ only in recovery. Test accuracy is on the held-out split that recovery never sees. This is
the evidence behind the strategy rule that adds shifts for small image datasets.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings

import regrow
from benchmarks.common import RESULTS, markdown_table, mean_std, stamp, stamp_markdown, write_csv

ARMS = {
    "fine-tune": ["recover.method=finetune", "recover.augment=none"],
    "fine-tune + shift": ["recover.method=finetune", "recover.augment=shift"],
    "distill": ["recover.method=distill", "recover.augment=none"],
    "distill + shift": ["recover.method=distill", "recover.augment=shift"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    info = stamp()
    results: dict[str, list[float]] = {}
    baseline: list[float] = []
    csv_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for arm, overrides in ARMS.items():
                report = regrow.run(
                    "demo",
                    overrides=[f"seed={seed}", "evaluate.latency=false", *overrides],
                    out_dir=f"{tmp}/{seed}-{arm}",
                    progress=False,
                )
                if arm == "fine-tune":
                    baseline.append(report.accuracy("baseline"))
                acc = report.accuracy("recovered")
                results.setdefault(arm, []).append(acc)
                csv_rows.append([arm, seed, f"{report.accuracy('baseline'):.4f}", f"{acc:.4f}"])
                print(f"seed {seed} {arm:18} recovered {100 * acc:.2f}%", flush=True)
    write_csv(RESULTS / "augment.csv", ["arm", "seed", "baseline_accuracy", "recovered_accuracy"], csv_rows, info)

    base_mean, base_std = mean_std(baseline)
    rows = []
    for arm, accs in results.items():
        m, sd = mean_std(accs)
        rows.append([arm, f"{100 * m:.2f} ± {100 * sd:.2f}", f"{100 * (m - base_mean):+.2f}", f"{100 * min(accs):.2f}"])
    wins = {
        method: sum(a > b for a, b in zip(results[f"{method} + shift"], results[method], strict=True))
        for method in ("fine-tune", "distill")
    }
    lines = [
        "# Augmentation during recovery: digits demo with and without random shifts",
        "",
        stamp_markdown(info),
        "",
        f"Dense digits CNN (recipe `demo`): **{100 * base_mean:.2f} ± {100 * base_std:.2f} %** test accuracy over "
        f"{args.seeds} seeds (360 test images, so one image is 0.28 points). 90 % global magnitude pruning, "
        "20 recovery epochs, everything else as the recipe says.",
        "",
        markdown_table(["recovery", "recovered test acc % (mean ± std)", "vs dense", "worst seed"], rows),
        "",
        f"Shifts beat no augmentation in {wins['fine-tune']} of {args.seeds} seeds with fine-tuning and in "
        f"{wins['distill']} of {args.seeds} with distillation.",
        "",
    ]
    (RESULTS / "augment.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
