"""The reference that benchmarks.language's recovery column needs: the dense model given the same extra epoch.

Run: python -m benchmarks.language_reference [--seeds 2] [--dense-epochs 2] [--recover-epochs 1]

benchmarks.language trains its dense GPT for 2 epochs only, so one more epoch of distillation lowers the test
perplexity of every pruned model below the dense model's. This study gives the dense model (the same cached one)
the very recovery the pruned models get (``regrow.recover(method="distill")`` from a frozen copy of itself,
lr 0.001, no early stop, same seed) and reports its test perplexity: the pruned models' recovered perplexity is
to be read against it. Results: benchmarks/results/language_reference.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings

import torch

import regrow
from benchmarks.common import RESULTS, markdown_table, mean_std, reseed, stamp, stamp_markdown
from benchmarks.language import load
from regrow.measure.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--recover-epochs", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    info = stamp()
    dense, continued = [], []
    for seed in range(args.seeds):
        data, model = load(seed, args.dense_epochs, None)
        dense.append(classification_metrics(model, data.test)["perplexity"])  # type: ignore[attr-defined]
        reseed(1000 + seed, data)
        regrow.recover(
            model,
            regrow.MaskSet({}),
            data.train,  # type: ignore[attr-defined]
            data.val,  # type: ignore[attr-defined]
            method="distill",
            teacher=copy.deepcopy(model),
            epochs=args.recover_epochs,
            lr=1e-3,
            patience=None,
            progress=False,
        )
        continued.append(classification_metrics(model, data.test)["perplexity"])  # type: ignore[attr-defined]
        print(f"seed {seed}: dense {dense[-1]:.3f}, after the extra epoch {continued[-1]:.3f}", flush=True)
    rows = [["dense", *[f"{v:.3f}" for v in dense], "{:.3f} ± {:.3f}".format(*mean_std(dense))]]
    rows.append(
        [
            "dense + the recovery epoch(s)",
            *[f"{v:.3f}" for v in continued],
            "{:.3f} ± {:.3f}".format(*mean_std(continued)),
        ]
    )
    lines = [
        "# Language model: the dense model given the pruned models' recovery",
        "",
        stamp_markdown(info),
        "",
        f"The cached dense GPT of benchmarks.language ({args.dense_epochs} epochs), then {args.recover_epochs} "
        "epoch(s) of distillation from a frozen copy of itself (lr 0.001, no early stop): the recovery each pruned "
        "model gets there. Test perplexity per seed and mean ± std.",
        "",
        markdown_table(["model", *[f"seed {s}" for s in range(args.seeds)], "mean"], rows),
        "",
    ]
    (RESULTS / "language_reference.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
