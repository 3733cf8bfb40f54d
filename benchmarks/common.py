"""Shared helpers for the benchmark scripts: result stamps (command, versions, machine) and tables."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from regrow.report import environment

RESULTS = Path(__file__).parent / "results"


def _commit() -> str | None:
    """The checkout's commit, with "+changes" when the code (regrow, the benchmark scripts) differs from it; None
    outside a git checkout. Results files written by an earlier run do not count."""
    root = Path(__file__).parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "regrow", "benchmarks/*.py")
        return head + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def stamp() -> dict[str, Any]:
    env = environment("cpu")
    return {
        "command": " ".join(
            shlex.quote(a) for a in ["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]]
        ),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "regrow": env["regrow"],
        "commit": _commit(),
        "python": env["python"],
        "cpu": env["cpu"],
        "cpu_count": env["cpu_count"],
        "threads": torch.get_num_threads(),
    }


def stamp_markdown(info: dict[str, Any]) -> str:
    return (
        f"Command: `{info['command']}`  \n"
        f"Measured {info['date']} on {info['cpu']} ({info['cpu_count']} cores, {info['threads']} torch threads), "
        f"torch {info['torch']}, regrow {info['regrow']}"
        + (f" at {info['commit']}" if info.get("commit") else "")
        + f", Python {info['python']}."
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list[Any]], info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write("".join(f"# {k}: {v}\n" for k, v in info.items()))
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


CACHE = Path(__file__).parent / "cache"


def fashion_mnist_or_exit(root: str | None, **kwargs: Any) -> Any:
    """Fashion-MNIST from the IDX files, or a clear message and exit code 0 (skip) when they are absent."""
    from regrow.data.fashion_mnist import available, fashion_mnist

    if not available(root):
        print(
            "Fashion-MNIST IDX files not found: install them with 'apt-get install dataset-fashion-mnist' or "
            "pass --data DIR (a folder with the four IDX files). Skipping this benchmark."
        )
        sys.exit(0)
    return fashion_mnist(root=root, **kwargs)


def cached_dense(name: str, seed: int, build: Any, train: Any, key: dict[str, Any]) -> Any:
    """A dense baseline trained once per seed and settings, kept as safetensors under benchmarks/cache/."""
    import hashlib
    import json

    from safetensors.torch import load_model, save_model

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = CACHE / f"{name}-seed{seed}-{digest}.safetensors"
    torch.manual_seed(seed)
    model = build()
    if path.is_file():
        load_model(model, str(path))
        return model
    train(model)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_model(model, str(partial))
    partial.replace(path)  # an interrupted save never leaves a half-written baseline behind
    return model


def code_digest(*scripts: str) -> str:
    """A hash of regrow's sources, this file and the named scripts: cached runs are reused only by the same code."""
    import hashlib

    h = hashlib.sha1()
    root = Path(__file__).parents[1]
    here = Path(__file__).parent
    for path in sorted([*(root / "regrow").rglob("*.py"), here / "common.py", *(here / f"{n}.py" for n in scripts)]):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


class RunCache:
    """Finished runs of one study, kept under ``benchmarks/cache/runs/<study>/``.

    A long benchmark that is interrupted resumes where it stopped when the same command is run again: a run
    is reused only when its settings, the code (``code_digest``) and the torch version are the same. The
    results say how many runs came from the cache. Delete the folder to measure everything afresh.
    """

    def __init__(self, study: str, settings: dict[str, Any], uses: tuple[str, ...] = ()) -> None:
        self.folder = CACHE / "runs" / study
        self.settings = {**settings, "code": code_digest(study, *uses), "torch": torch.__version__}
        self.reused = 0
        self.total = 0

    def _path(self, key: dict[str, Any]) -> Path:
        import hashlib
        import json

        full = {**self.settings, **key}
        return (
            self.folder
            / f"{hashlib.sha1(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]}.json"
        )

    def lookup(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The cached result of this run, or None; counts towards the note."""
        import json

        self.total += 1
        path = self._path(key)
        if not path.is_file():
            return None
        self.reused += 1
        return json.loads(path.read_text(encoding="utf-8"))["result"]

    def store(self, key: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        import json

        path = self._path(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(
            json.dumps({"key": {**self.settings, **key}, "result": result}, default=str), encoding="utf-8"
        )
        partial.replace(path)  # atomic: an interrupted write never leaves a broken entry
        return result

    def get(self, key: dict[str, Any], compute: Any) -> dict[str, Any]:
        """The cached result of this run, else ``compute()``, stored."""
        cached = self.lookup(key)
        return cached if cached is not None else self.store(key, compute())

    def run(
        self, runs: list[tuple], fields: tuple[str, ...], measure: Any, extra: tuple, jobs: int, describe: Any
    ) -> dict[tuple, dict[str, Any]]:
        """Every run's result (run = values of ``fields``): from the cache, else measured by ``run_all`` and
        stored as it finishes, with one line printed by ``describe(run, result)``."""

        def key(run: tuple) -> dict[str, Any]:
            return dict(zip(fields, run, strict=True))

        done = {run: self.lookup(key(run)) for run in runs}

        def finished(run: tuple, result: dict[str, Any]) -> None:
            done[run] = self.store(key(run), result)
            print(f"  {describe(run, result)}", flush=True)

        run_all([run for run in runs if done[run] is None], measure, extra, jobs, finished)
        return done  # type: ignore[return-value]

    def note(self) -> str:
        """A sentence for the results, when any run came from the cache."""
        if not self.reused:
            return ""
        return (
            f"{self.reused} of {self.total} runs were measured by an earlier invocation with the same code, "
            "settings and torch version and taken from its cache, "
            f"`{self.folder.relative_to(CACHE.parent.parent)}`; the stamp above is this invocation's."
        )


def end_with_parent(parent: int, poll: float = 1.0) -> None:
    """Worker initializer: end this process once ``parent`` is gone.

    A worker of a process pool outlives a parent that is killed (SIGTERM, SIGKILL) and would go on using a core
    for an hour-long run nobody collects; a daemon thread checks the parent every ``poll`` seconds instead.
    """
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def run_all(todo: list[tuple], measure: Any, extra: tuple, jobs: int, finished: Any) -> None:
    """``finished(run, measure(*extra[:1], *run, *extra[1:]))`` for every run, ``jobs`` processes at a time.

    Every run that succeeds is handed to ``finished`` (and so cached) even when another one fails; the first
    failure is raised once the others are done. The workers end when this process does, however it ends.
    """
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    def call(run: tuple) -> tuple:
        return (*extra[:1], *run, *extra[1:])

    if jobs <= 1:
        for run in todo:
            finished(run, measure(*call(run)))
        return
    failure: BaseException | None = None
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(measure, *call(run)): run for run in todo}
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - keep the other runs' results, raise at the end
                print(f"  run {futures[future]} failed: {type(exc).__name__}: {exc}", flush=True)
                failure = failure or exc
                continue
            finished(futures[future], result)
    if failure is not None:
        raise failure


def runs_text(jobs: int) -> str:
    return f"{jobs} at a time, one process each" if jobs > 1 else "one after another, in one process"


def reseed(seed: int, data: Any) -> None:
    """Seed torch and the training loader's shuffling: each run is then independent of the runs before it,
    so a benchmark resumed from its cache gives the numbers an uninterrupted one gives."""
    torch.manual_seed(seed)
    generator = getattr(data.train, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)


def mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


LENET_DENSE = {"epochs": 30, "lr": 2e-3, "weight_decay": 1e-4}  # AdamW, cosine, 5 % warm-up


def dense_lenet(seed: int, data: Any) -> Any:
    """LeNet-300-100 trained on Fashion-MNIST once per seed (cached); shared by the unstructured studies."""
    import regrow
    from regrow.models import MODELS

    def train(model: Any) -> None:
        regrow.recover(
            model,
            regrow.MaskSet({}),
            data.train,
            data.val,
            method="finetune",
            epochs=LENET_DENSE["epochs"],
            lr=LENET_DENSE["lr"],
            weight_decay=LENET_DENSE["weight_decay"],
            patience=None,
            progress=False,
        )

    return cached_dense(
        "lenet_300_100",
        seed,
        lambda: MODELS.get("lenet_300_100")(),
        train,
        {"dense": LENET_DENSE, "data": data.description},
    )
