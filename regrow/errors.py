"""Errors raised for bad input.

Every problem a user can cause (a wrong key, a sparsity of 1.5, a layer name that does not exist, a
corrupt checkpoint) is raised as :class:`RegrowError` with one paragraph that names the problem and the
allowed values. The command line prints that paragraph and exits with code 2, without a traceback.
Anything else that escapes is a bug in regrow and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class RegrowError(ValueError):
    """A problem with the user's input, explained in one paragraph."""


def one_of(what: str, value: object, allowed: Iterable[str]) -> RegrowError:
    """Build the standard "unknown X" error that lists what is allowed."""
    choices = ", ".join(sorted(allowed))
    return RegrowError(f"unknown {what} {value!r}; allowed values: {choices}.")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (``Type`` alone for an empty message, as a bare ``assert`` gives)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


class SpeedWarning(UserWarning):
    """The chosen pruning will not make the model faster on dense kernels, or its widths are unfriendly."""


_SIGNALLED: list[KeyboardInterrupt] = []  # the stop a signal handler last raised, until the run that saw it ends


def signalled(stop: KeyboardInterrupt) -> KeyboardInterrupt:
    """Remember ``stop``, which a signal handler is about to raise, and return it. Python runs a handler wherever
    the main thread is; inside a ``__del__``, a weakref callback or a garbage-collector callback what it raises is
    printed as "Exception ignored in ..." and lost, and the work would go on as if no signal had come.
    :func:`raise_lost_stop` raises it again at the next step of the work."""
    _SIGNALLED[:] = [stop]
    return stop


def raise_lost_stop() -> None:
    """Raise the stop a signal asked for if it is still remembered (:func:`signalled`): the training and evaluation
    loops and each stage of a run call this. Once the stop unwinds the run, :func:`forget_stop` clears it."""
    if _SIGNALLED:
        raise _SIGNALLED.pop()


def forget_stop() -> None:
    """The run that a remembered stop ended is over (the command line, when it returns)."""
    _SIGNALLED.clear()


def interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM / SIGHUP through the command line) that ``exc`` is or that it was
    raised from or during, else None. Code a signal interrupts can wrap what it raises in another error: Python
    3.11 wraps whatever a class body's ``__set_name__`` raises in a RuntimeError, and a signal can land there while
    a module is imported (torch imports ``torch._dynamo`` when the first optimizer is made)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
