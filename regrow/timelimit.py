"""A wall-clock limit for third-party work that may not end (e.g. torch-pruning's grouping on some graphs)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from regrow.errors import RegrowError


class _OutOfTime(BaseException):
    """Raised by the alarm inside the limited work; BaseException, so that no ``except Exception`` there hides it."""


@contextmanager
def time_limit(seconds: float | None, explain: str) -> Iterator[None]:
    """Raise ``RegrowError(explain)`` if the block runs longer than ``seconds`` (Unix main thread only: elsewhere,
    or with ``seconds`` None, the block runs without a limit). Uses SIGALRM; a handler set before is restored."""
    usable = (
        seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def alarm(signum: int, frame: object) -> None:
        raise _OutOfTime

    import time

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # an alarm set before: re-armed afterwards
    started = time.monotonic()
    try:
        yield
    except _OutOfTime:
        raise RegrowError(explain) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # the rest of the outer alarm (at least a moment, so that it still fires)
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))
