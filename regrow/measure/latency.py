"""Measured latency: warm-up, then the median of repeated timed forward passes."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from regrow.batches import batch_size, forward, model_device


@dataclass
class Latency:
    """Forward-pass time of one batch, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    repeats: int
    warmup: int
    device: str
    times: list[float] = field(default_factory=list, repr=False)  # every timed pass, in order (not saved)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["times"]
        return out

    @property
    def spread(self) -> float:
        """p90 / p10: how far the timings spread (1 on a quiet machine; above ``NOISY_SPREAD``: noisy)."""
        return self.p90_ms / self.p10_ms if self.p10_ms > 0 else float("inf")


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    inputs: Any,
    *,
    repeats: int = 20,
    warmup: int = 5,
    min_seconds: float = 0.25,
    max_repeats: int = 1000,
) -> Latency:
    """Time ``model(inputs)`` in eval mode: ``warmup`` untimed runs, then timed runs.

    At least ``repeats`` timed runs, and more (up to ``max_repeats``) until ``min_seconds`` of timings
    are collected, so that the median of a sub-millisecond model is not left to a handful of samples.
    Compare two models only with numbers measured in the same process on the same machine.
    """
    device = model_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            forward(model, inputs)
        sync()
        times: list[float] = []
        while len(times) < max(1, repeats) or (sum(times) < 1000.0 * min_seconds and len(times) < max_repeats):
            start = time.perf_counter()
            forward(model, inputs)
            sync()
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    deciles = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Latency(
        median_ms=statistics.median(times),
        p10_ms=deciles[0],
        p90_ms=deciles[-1],
        batch_size=batch_size(inputs),
        threads=torch.get_num_threads(),
        repeats=len(times),
        warmup=warmup,
        device=str(device),
        times=times,
    )


@torch.inference_mode()
def compare_latency(
    first: nn.Module, second: nn.Module, inputs: Any, *, rounds: int = 30, warmup: int = 5
) -> tuple[Latency, Latency]:
    """Time two models side by side, alternating one forward pass of each per round.

    Interleaving puts both under the same machine load at the same moments, so their ratio is far
    steadier than two measurements taken minutes apart.
    """
    models = (first, second)
    modes = [m.training for m in models]
    device = model_device(first)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: tuple[list[float], list[float]] = ([], [])
    try:
        for m in models:
            m.eval()
            for _ in range(warmup):
                forward(m, inputs)
        sync()
        for _ in range(max(1, rounds)):
            for m, bucket in zip(models, times):
                start = time.perf_counter()
                forward(m, inputs)
                sync()
                bucket.append((time.perf_counter() - start) * 1000.0)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)

    def summary(ts: list[float]) -> Latency:
        deciles = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        return Latency(
            statistics.median(ts),
            deciles[0],
            deciles[-1],
            batch_size(inputs),
            torch.get_num_threads(),
            len(ts),
            warmup,
            str(device),
            list(ts),
        )

    return summary(times[0]), summary(times[1])


NOISY_SPREAD = 2.0  # p90 / p10 of one model's timings above this: the machine was too busy to trust them alone
NOISY_RATIOS = 0.25  # interquartile range of the per-pair speed-ups, relative to their median, above this: noisy


def pair_noise(first: Latency, second: Latency) -> str | None:
    """Why an interleaved comparison (:func:`compare_latency`) is too noisy to claim a speed-up from, or None.

    Each round times the two models back to back, so the round's ratio sees the load both saw; on a quiet
    machine the ratios agree within a few percent. Noisy: their quartiles lie on both sides of 1 (some rounds
    say faster, others slower) and their interquartile range is above ``NOISY_RATIOS`` of their median. A
    large but one-sided spread (e.g. a model of a few microseconds against one of milliseconds) still decides.
    """
    ratios = [a / b for a, b in zip(first.times, second.times) if b > 0]
    if len(ratios) < 4:
        return None
    q1, mid, q3 = statistics.quantiles(ratios, n=4)
    if q1 < 1.0 < q3 and mid > 0 and (q3 - q1) / mid > NOISY_RATIOS:
        return (
            f"the speed-ups of the {len(ratios)} interleaved pairs spread from {q1:.2f}x to {q3:.2f}x (quartiles), "
            f"both sides of 1 and more than {100 * NOISY_RATIOS:.0f}% of their median {mid:.2f}x"
        )
    return None
