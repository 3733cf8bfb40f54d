"""Cost of keeping masks during recovery: time per training step, masked versus dense.

Run: python -m benchmarks.overhead [--rounds 200]

Four step functions are timed side by side, one step of each per round, interleaved so that all see the
same machine load: a dense step and a 90 %-masked step with regrow's training step
(``regrow.recovery.loop.masked_step``), and a dense step and a step through ``torch.nn.utils.prune``'s
forward-pre-hook masks (global L1, 90 %) with a plain PyTorch step. Same model, batch, optimizer (SGD,
momentum 0.9) and data for all. Reported: the median step time of each and the ratio masked / dense
for each library.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import regrow
from benchmarks.common import RESULTS, markdown_table, stamp, stamp_markdown, write_csv
from regrow.config import RecoverConfig
from regrow.masks import MaskEnforcer
from regrow.models import MODELS
from regrow.recovery.loop import masked_step
from regrow.recovery.methods import TaskLoss
from regrow.select import final_classifier

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "LeNet-300-100, batch 128": (lambda: MODELS.get("lenet_300_100")(), (128, 1, 28, 28)),
    "ResNet-style CNN, batch 64": (lambda: MODELS.get("resnet")(), (64, 1, 28, 28)),
}


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure_case(
    build: Callable[[], nn.Module], shape: tuple[int, ...], sparsity: float, rounds: int
) -> dict[str, float]:
    """Median milliseconds per training step of the four variants, interleaved."""
    torch.manual_seed(0)
    base = build().train()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    loss = TaskLoss(RecoverConfig())
    regrow_dense = copy.deepcopy(base)
    no_masks = MaskEnforcer(regrow.MaskSet({}), regrow_dense)
    regrow_masked = copy.deepcopy(base)
    masks = regrow.prune(regrow_masked, sparsity, keep_dense=False)
    regrow_masked.train()
    enforcer = MaskEnforcer(masks, regrow_masked)
    torch_dense = copy.deepcopy(base)
    torch_masked = copy.deepcopy(base)
    classifier = final_classifier(torch_masked)
    layers = [
        (m, "weight")
        for name, m in torch_masked.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name != classifier
    ]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=sparsity)

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    opt_rd, opt_rm, opt_td, opt_tm = sgd(regrow_dense), sgd(regrow_masked), sgd(torch_dense), sgd(torch_masked)
    variants = {
        "regrow dense": lambda: masked_step(regrow_dense, loss, opt_rd, no_masks, x, y),
        "regrow masked": lambda: masked_step(regrow_masked, loss, opt_rm, enforcer, x, y),
        "torch dense": lambda: plain_step(torch_dense, opt_td, x, y),
        "torch.nn.utils.prune masked": lambda: plain_step(torch_masked, opt_tm, x, y),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(rounds + 10):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if i >= 10:  # warm-up rounds are not timed
                times[name].append((time.perf_counter() - start) * 1000.0)
    assert all(torch.count_nonzero(regrow_masked.get_parameter(f)[~m]) == 0 for f, m in masks.items())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="interleaved steps per variant (ResNet: a quarter)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
    info = stamp()
    rows = []
    for case, (build, shape) in CASES.items():
        rounds = args.rounds if "LeNet" in case else max(20, args.rounds // 4)
        med = measure_case(build, shape, args.sparsity, rounds)
        row = [
            case,
            f"{med['regrow dense']:.3f}",
            f"{med['regrow masked']:.3f}",
            f"{med['regrow masked'] / med['regrow dense']:.3f}",
            f"{med['torch dense']:.3f}",
            f"{med['torch.nn.utils.prune masked']:.3f}",
            f"{med['torch.nn.utils.prune masked'] / med['torch dense']:.3f}",
        ]
        print(" | ".join(row), flush=True)
        rows.append(row)
    header = [
        "model",
        "regrow dense ms",
        "regrow masked ms",
        "regrow ratio",
        "torch dense ms",
        "torch.nn.utils.prune ms",
        "torch.nn.utils.prune ratio",
    ]
    write_csv(RESULTS / "overhead.csv", header, rows, info)
    text = [
        "# Overhead of masks during recovery: time per training step",
        "",
        stamp_markdown(info),
        "",
        f"Median time of one training step (forward, backward, SGD step) at {args.sparsity:.0%} unstructured "
        f"sparsity versus the same dense model, {args.rounds} interleaved steps of each variant (a quarter for "
        "the ResNet). regrow zeroes the pruned weights' gradients before each step (one fused multiply); "
        "torch.nn.utils.prune recomputes `weight = weight_orig * mask` in a forward pre-hook.",
        "",
        markdown_table(header, rows),
        "",
    ]
    (RESULTS / "overhead.md").write_text("\n".join(text), encoding="utf-8")


if __name__ == "__main__":
    main()
