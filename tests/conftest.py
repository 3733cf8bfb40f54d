"""Tiny models and data shared by the tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch import nn

from benchmarks import torchvision_models


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def tiny_llama(seed: int = 0, vocab_size: int = 64, **config_overrides):
    """A random-init two-layer Llama (grouped-query attention: 4 query heads, 2 key/value heads), eval mode."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
        }
        | config_overrides
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def make_batches(n_batches: int = 6, batch: int = 16, d_in: int = 8, classes: int = 3, seed: int = 0):
    """Linearly separable synthetic classification batches."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, classes, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, d_in, generator=g)
        out.append((x, (x @ w).argmax(dim=1)))
    return out


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers), each worker gets its share of the cores, for torch's
    threads and for the processes its tests start (OMP_NUM_THREADS), so that the workers do not oversubscribe
    them. An OMP_NUM_THREADS set by the caller is kept."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """The command line's busy-machine warning reads the machine's load: tests see a machine nobody else uses,
    so what they print does not depend on what else runs (test_cli tests the warning itself)."""
    monkeypatch.setattr("regrow.cli._busy_elsewhere", lambda: None)


@pytest.fixture
def mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def macs_as_latency(monkeypatch):
    """Latency budgets measured deterministically: a model's 'latency' is its MACs on one sample."""
    import regrow.structural as structural
    from regrow.measure.cost import dense_macs
    from regrow.measure.latency import Latency

    def fake(first, second, inputs, rounds=15, warmup=5):
        one = inputs[:1]
        return (
            Latency(float(dense_macs(first, one)), 0, 0, 1, 1, 1, 0, "cpu"),
            Latency(float(dense_macs(second, one)), 0, 0, 1, 1, 1, 0, "cpu"),
        )

    monkeypatch.setattr(structural, "compare_latency", fake)


def first_calls(model: nn.Module, x, modules: dict[str, nn.Module]) -> dict[str, tuple]:
    """What each of ``modules`` (by name) received and returned on its first call in one no-grad pass of ``model``
    on ``x`` (a stand-in is then run on the same arguments and compared)."""
    calls = {}

    def keep(name):
        def hook(module, args, output):
            calls.setdefault(name, (args, output.detach().clone()))

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def import_timm():
    """timm, for the test zoo, importable without the real torchvision.

    torchvision's PyPI build needs CUDA libraries and does not load beside the CPU torch wheel, and timm imports
    it; timm's model code needs only ``FrozenBatchNorm2d`` from it. When the real torchvision cannot be imported,
    tests/stubs (a test-only stand-in, see tests/stubs/README.md) is put on sys.path for timm's import only, and
    taken off again: left there, other libraries would take it for torchvision (transformers asks find_spec,
    finds it, then imports names it lacks). Skips the test when timm itself is not installed.
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (make install adds it)", allow_module_level=True)

    try:
        return importlib.import_module("timm")
    except Exception:  # noqa: BLE001 - torchvision absent, or present but broken (CUDA libraries missing)
        torchvision_models.drop("torchvision")
    stubs = str(Path(__file__).parent / "stubs")
    sys.path.insert(0, stubs)
    try:
        return importlib.import_module("timm")
    finally:
        sys.path.remove(stubs)
        torchvision_models.drop("torchvision")  # timm holds what it took; nothing else sees the stand-in
        importlib.invalidate_caches()


@functools.cache
def import_torchvision_models():
    """torchvision's real model definitions (``torchvision.models``), for the test zoo.

    Where torchvision imports (a CUDA machine), that. Otherwise the copy ``make install`` unpacks in
    ``.venv/torchvision-models``, imported without its compiled operators and then hidden from other libraries
    (benchmarks/torchvision_models.py). Skips when neither is there.
    """
    import importlib

    try:
        return importlib.import_module("torchvision.models")
    except Exception:  # noqa: BLE001 - absent, or present but broken (CUDA libraries missing)
        torchvision_models.drop("torchvision")
    try:
        return torchvision_models.load()
    except FileNotFoundError as exc:
        pytest.skip(str(exc), allow_module_level=True)


def interrupt_run(argv, cwd, ready, signum, *, settle=1.0):
    """Start ``python -m regrow.cli ARGV`` in ``cwd`` (1 torch thread), wait until ``ready()`` (at most 60 s),
    then ``settle`` seconds more, send ``signum`` and return ``(returncode, stderr)``. The child starts with
    SIGHUP at its default even when the test runner runs under ``nohup`` (which regrow, by design, leaves
    ignored), so every signal reaches regrow's own handling."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = subprocess.Popen(
        [sys.executable, "-m", "regrow.cli", *argv],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    for _ in range(600):
        if ready():
            break
        time.sleep(0.1)
    else:
        run.kill()
        pytest.fail("the run never started writing")
    time.sleep(settle)
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    return run.returncode, err
