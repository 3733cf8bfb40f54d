"""Gaps to dense paired by seed, from the committed per-seed results of recovery_methods.

Run: python -m benchmarks.paired_gaps [--data DIR]

Each seed of ``recovery_methods`` prunes and recovers its own dense model, so a method's gap to dense can be
taken seed by seed: ``recovered(seed) - dense(seed)``. Pairing removes the spread between the dense models
from the comparison. This script reads ``benchmarks/results/recovery_methods.csv`` (nothing is retrained:
the dense models come from benchmarks/cache/, or are trained once, deterministically, when it is empty),
and writes each method's per-seed gaps, their mean and a Student-t 95 % confidence interval of that mean
to ``benchmarks/results/recovery_methods_paired.md``. With 3 seeds the interval is wide (t = 4.30): it
says how far the table's mean gaps can be trusted, not more.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics

from benchmarks.common import RESULTS, dense_lenet, fashion_mnist_or_exit, markdown_table, stamp, stamp_markdown
from regrow.measure.metrics import classification_metrics

SOURCE = RESULTS / "recovery_methods.csv"
GOAL = -1.0  # the goal: the best method at 0.98 within 1.0 point of dense


def read_results(path: str) -> tuple[dict[str, str], dict[tuple[str, float], dict[int, float]]]:
    """The CSV's stamp (its ``# key: value`` lines) and accuracies by (method, sparsity) and seed."""
    stamp_lines, rows = {}, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("# "):
                key, _, value = line[2:].partition(": ")
                stamp_lines[key] = value.strip()
            else:
                rows.append(line)
    results: dict[tuple[str, float], dict[int, float]] = {}
    for row in csv.DictReader(rows):
        results.setdefault((row["method"], float(row["sparsity"])), {})[int(row["seed"])] = float(row["test_accuracy"])
    return stamp_lines, results


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the Student-t confidence interval of the mean."""
    from scipy.stats import t

    mean = statistics.mean(values)
    half = t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with the four Fashion-MNIST IDX files")
    args = parser.parse_args()
    source, results = read_results(str(SOURCE))
    seeds = sorted({seed for accs in results.values() for seed in accs})
    dense = {}
    for seed in seeds:  # the same dense models, data split and loader settings as recovery_methods
        data = fashion_mnist_or_exit(args.data, batch_size=128, seed=seed)
        dense[seed] = classification_metrics(dense_lenet(seed, data), data.test)["accuracy"]
    sparsities = sorted({s for _, s in results})
    methods = list(dict.fromkeys(name for name, _ in results))
    rows = []
    for s in sparsities:
        for name in methods:
            accs = results[(name, s)]
            gaps = [100 * (accs[seed] - dense[seed]) for seed in seeds]
            mean, low, high = t_interval(gaps)
            rows.append(
                [
                    f"{s:g}",
                    name,
                    " / ".join(f"{g:+.2f}" for g in gaps),
                    f"{mean:+.2f}",
                    f"[{low:+.2f}, {high:+.2f}]",
                    f"{sum(g >= GOAL for g in gaps)} of {len(gaps)}",
                ]
            )
    header = [
        "sparsity",
        "method",
        "gap per seed (" + " / ".join(str(seed) for seed in seeds) + ")",
        "mean gap",
        "95 % CI of the mean",
        f"seeds within {-GOAL:g} point",
    ]
    lines = [
        "# Recovery methods: gaps to dense, paired by seed",
        "",
        stamp_markdown(stamp()),
        "",
        f"Source: `recovery_methods.csv` (command `{source.get('command')}`, measured {source.get('date')}). "
        "Dense test accuracy per seed: "
        + ", ".join(f"seed {seed} {100 * dense[seed]:.2f} %" for seed in seeds)
        + ". Gap = recovered minus that seed's own dense model, in test-accuracy points; the interval is "
        f"Student-t with {len(seeds) - 1} degrees of freedom.",
        "",
        markdown_table(header, rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "recovery_methods_paired.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
