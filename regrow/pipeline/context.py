"""What every stage of a run shares: seeding, exact kernels, stage timings, loaders read without side effects."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

from regrow.errors import raise_lost_stop

log = logging.getLogger("regrow")

P = ParamSpec("P")
R = TypeVar("R")

BASELINE_WARMUP = 0.05  # warm-up share of the baseline training regrow runs (model.train)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch.

    The pipeline reseeds before each stage that draws random numbers (baseline training, pruning,
    recovery), so that measuring more or less (e.g. latency on or off, which iterates loaders and so
    draws seeds) never changes what is trained.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reproducible_kernels(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with cuDNN's deterministic algorithms, then restore the caller's settings.

    On a GPU, cuDNN's default convolution kernels may sum in a different order from one call to the next,
    so the same recipe gave different numbers run after run (measured on an H200: recovered losses
    1.14747 / 1.14748 from identical settings); with these two flags, bitwise the same. CPU runs are
    unaffected.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        cudnn = torch.backends.cudnn
        saved = cudnn.deterministic, cudnn.benchmark
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            return fn(*args, **kwargs)
        finally:
            cudnn.deterministic, cudnn.benchmark = saved

    return wrapper


def default_out_dir(name: str) -> Path:
    """``runs/<name>-<timestamp>``, numbered when two runs start in the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{name}-{stamp}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


class Timer:
    """Wall-clock seconds per stage name, summed over repeats, in the order the stages first ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        raise_lost_stop()  # a signal whose stop Python swallowed (regrow.errors.signalled)
        log.info("stage: %s", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class Unshuffled:
    """Iterate a loader without spending its shuffling randomness: its generator's state is put back after,
    so measuring before training (strategy auto, timing a step) never changes the order training sees."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.generator = getattr(loader, "generator", None)

    def __enter__(self) -> Any:
        self.state = self.generator.get_state() if self.generator is not None else None
        return self.loader

    def __exit__(self, *exc: Any) -> None:
        if self.state is not None:
            self.generator.set_state(self.state)
