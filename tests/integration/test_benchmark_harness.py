"""The benchmark harness's process pool: workers must not outlive a killed benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

# Two runs of time.sleep(120) on two workers; the parent prints its workers' pids once both are busy.
PARENT = """
import multiprocessing, time
from benchmarks.common import run_all

def started(run, result):
    pass

if __name__ == "__main__":
    import threading
    def report():
        while len(multiprocessing.active_children()) < 2:
            time.sleep(0.1)
        time.sleep(1.0)
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    threading.Thread(target=report, daemon=True).start()
    run_all([(120,), (120,)], time.sleep, (), 2, started)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has finished; only its exit status is left to collect


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_pool_workers_end_when_the_benchmark_is_killed(tmp_path: Path, sig: int) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        workers = [int(p) for p in line.split()]
        assert len(workers) >= 2, f"expected the pool's workers, got {line!r}"
        assert all(_alive(pid) for pid in workers)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "a worker kept running after its benchmark was killed"
    finally:
        parent.kill()
        parent.wait()
