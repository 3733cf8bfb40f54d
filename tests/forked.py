"""Child processes forked from one Python process that has already done the imports they need.

A fresh interpreter spends seconds on imports alone on 2 cores (torch, transformers, regrow); a test module that
starts dozens of processes pays that once with :class:`Forker`. Nothing runs in that process but the imports (and
the definitions of ``preload``), so each child starts as a fresh process would after them: its own pid, files
and signals, its own exit code, killed by a signal like any process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SERVE = r"""
import json, os, signal, sys
{preload}
for _line in sys.stdin:
    _code, _cwd, _out, _err = json.loads(_line)
    _pid = os.fork()
    if _pid == 0:
        _status = 1
        try:
            os.chdir(_cwd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for _fd, _path in ((1, _out), (2, _err)):
                os.dup2(os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), _fd)
            signal.alarm({timeout})  # a child that hangs ends with SIGALRM, which its exit code reports
            exec(_code, dict(globals(), __name__="__main__"))
            _status = 0
        except SystemExit as exc:
            _status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_status)
    _, _status = os.waitpid(_pid, 0)
    print(os.waitstatus_to_exitcode(_status), flush=True)
"""


@dataclass
class Done:
    returncode: int  # negative: the signal that ended the child
    stdout: str
    stderr: str


class Forker:
    """``Forker(preload)`` starts a Python process (1 torch thread) that executes ``preload``, then waits;
    ``run(code, cwd)`` executes ``code`` as ``__main__`` in a child forked from it, with ``cwd`` as its working
    folder, and returns what it wrote and its exit code. ``close()`` ends the process."""

    def __init__(self, preload: str, *, timeout: int = 300) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        serve = _SERVE.format(preload=preload, timeout=timeout)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", serve], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self._files = tempfile.TemporaryDirectory()

    def run(self, code: str, cwd: Path | str | None = None) -> Done:
        out, err = Path(self._files.name) / "stdout", Path(self._files.name) / "stderr"
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps([code, str(cwd or os.getcwd()), str(out), str(err)]) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the process that forks the children ended (exit code {self._proc.wait()})")
        return Done(int(line), out.read_text(), err.read_text())

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._files.cleanup()
