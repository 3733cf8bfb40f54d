"""The ``regrow`` command line: ``run``, ``demo``, ``sensitivity``, ``list``.

Bad input prints one paragraph and exits with code 2 (no traceback; ``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import regrow.distributed as distributed
from regrow.errors import RegrowError, forget_stop, interruption, signalled

log = logging.getLogger("regrow")
EXIT_BAD_INPUT = 2
EXIT_LOST_PEER = 1  # several processes: another rank stopped first (not bad input)

LISTS = (
    "patterns",
    "criteria",
    "schedules",
    "methods",
    "lr_schedules",
    "augments",
    "allocations",
    "recipes",
    "models",
    "datasets",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: same shape as ours, exit 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"regrow: error: {message}\n")


def _add_run_options(p: argparse.ArgumentParser, default_out: str = "runs/<name>-<timestamp>") -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set prune.sparsity=0.8 (repeatable; values are YAML)",
    )
    p.add_argument("--out", metavar="DIR", help=f"output directory (default: {default_out})")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty directory: regrow's files from an earlier run are replaced, others kept",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads (default: torch's, one per core; a busy machine gets a warning that says when fewer "
        "would be faster). Results on the CPU are reproducible for one thread count",
    )
    _add_global_options(p)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, 1 or more; got {text!r}")
    return int(text)


def _set_threads(threads: int | None) -> None:
    """``--threads``; without it, a warning when other processes keep the cores busy: torch's threads then wait on
    each other, and a run can be many times slower than with one thread."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        return
    others = _busy_elsewhere()
    cores, mine = os.cpu_count() or 1, torch.get_num_threads()
    if others is not None and mine > 1 and others + mine > cores:
        log.warning(
            "the machine is busy (%.1f other processes running on %d cores) and torch would use %d threads: they "
            "may wait on each other and run many times slower than fewer would; pass --threads %d (or set "
            "OMP_NUM_THREADS).",
            others,
            cores,
            mine,
            max(1, cores - round(others)),
        )


def _busy_elsewhere() -> float | None:
    """About how many processes other than this one keep a core busy: the smaller of the 1-minute load average
    and the processes running right now (Linux's /proc/loadavg, this one not counted); None where unknown."""
    try:
        fields = open("/proc/loadavg", encoding="ascii").read().split()  # noqa: SIM115 - one read
        load, running = float(fields[0]), int(fields[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, min(load, float(running)))


def _add_resume_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run whose checkpoint is in --out (same recipe and --set values); with no "
        "checkpoint there, start the run",
    )


def _add_global_options(p: argparse.ArgumentParser) -> None:
    # also accepted after the command (regrow run demo --debug); SUPPRESS keeps the top-level value otherwise
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only print the summary")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="regrow",
        description="Prune a trained PyTorch model, fine-tune it to recover the lost accuracy, and report "
        "before/after accuracy, size, MACs and measured latency.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print the final summary")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run a recipe: baseline -> prune -> recover -> report -> export",
        description="Run the pipeline described by a YAML recipe (a path, or the name of a "
        "built-in recipe from `regrow list recipes`). On several processes: `torchrun --nproc-per-node N -m regrow "
        "run RECIPE` (DistributedDataParallel; each batch split across them, rank 0 writes; docs/scale.md).",
    )
    run.add_argument("recipe", help="recipe file or built-in recipe name")
    _add_run_options(run)
    _add_resume_option(run)

    demo = sub.add_parser(
        "demo",
        help="the built-in demo on scikit-learn's digits (no download)",
        description="Train a small CNN on scikit-learn's 8x8 digits, prune 90% of its weights "
        "with global magnitude, recover with distillation, and write the report.",
    )
    _add_run_options(demo)
    _add_resume_option(demo)

    sens = sub.add_parser(
        "sensitivity",
        help="prune each target or group alone and measure the loss",
        description="Sensitivity analysis of a recipe's model (trained first if the recipe says so): each target, "
        "or for channel/head patterns each coupled group, pruned alone to each level of sensitivity.levels; loss "
        "and accuracy on calibration batches. A transfer recipe (model.train.data) is measured on its source data.",
    )
    sens.add_argument("recipe", help="recipe file or built-in recipe name")
    _add_run_options(sens, default_out="runs/<name>-sensitivity-<timestamp>")

    lst = sub.add_parser(
        "list",
        help="list registered patterns, criteria, schedules, methods, recipes, ...",
        description="List what can be named in a recipe.",
    )
    lst.add_argument("what", nargs="?", choices=LISTS, help="one category (default: all)")
    _add_global_options(lst)
    return parser


def _print_list(what: str | None) -> None:
    from regrow.config import builtin_recipes
    from regrow.criteria import CRITERIA
    from regrow.data import DATASETS
    from regrow.data.augment import AUGMENTS
    from regrow.models import MODELS
    from regrow.patterns import PATTERNS
    from regrow.recovery.lr import LR_SCHEDULES
    from regrow.recovery.methods import METHODS
    from regrow.schedules import SCHEDULES

    registries = {
        "patterns": PATTERNS,
        "criteria": CRITERIA,
        "schedules": SCHEDULES,
        "methods": METHODS,
        "lr_schedules": LR_SCHEDULES,
        "augments": AUGMENTS,
        "models": MODELS,
        "datasets": DATASETS,
    }
    for name in [what] if what else LISTS:
        print(f"{name}:")
        if name == "allocations":
            from regrow.allocation import ALLOCATIONS

            docs = {
                "uniform": "the same sparsity for every target or group",
                "global": "one ranking of scores over all targets (scope global)",
                "sensitivity": "sparsity where the sensitivity curves say it costs least",
                "search": "evolutionary search around the sensitivity allocation, scored on calibration data",
            }
            for item in ALLOCATIONS:
                print(f"  {item:<22} {docs[item]}")
            continue
        if name == "recipes":
            import yaml

            for recipe, path in builtin_recipes().items():
                first = (yaml.safe_load(path.read_text()) or {}).get("description", "")
                print(f"  {recipe:<22} {first}")
        else:
            reg = registries[name]
            for item in reg.names():
                if name == "lr_schedules" and item == "rewind":
                    continue  # chosen by recover.rewind, not by recover.lr_schedule
                print(f"  {item:<22} {reg.describe(item)}")


def _print_summary(report: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from regrow.report.markdown import human, pct, perplexity_sentence

    s = report.snapshots  # type: ignore[attr-defined]
    lm = all(snap.perplexity is not None for snap in s.values())  # a language model: scored per token
    metric = next(iter(s.values())).metric if s else "accuracy"  # e.g. an embedding's cosine similarity
    plain = metric == "accuracy"
    table = Table(title=f"regrow: {report.name}")  # type: ignore[attr-defined]
    for col in (
        "stage",
        *(("perplexity", "token acc") if lm else ("test acc" if plain else f"test {metric}", "test loss")),
        "nonzero params",
        "target sparsity",
        "dense MACs",
        "latency ms",
        "size",
    ):
        table.add_column(col, justify="right" if col != "stage" else "left")
    structural = bool(report.prune.get("structure"))  # type: ignore[attr-defined]
    for stage, snap in s.items():
        table.add_row(
            stage,
            f"{snap.perplexity:.3f}" if lm else pct(snap.accuracy) if plain else f"{snap.accuracy:.4f}",
            pct(snap.accuracy) if lm else f"{snap.loss:.4f}",
            human(snap.nonzero_params),
            "n/a (shrunk)" if structural else pct(snap.target_sparsity),
            human(snap.macs),
            f"{snap.latency.median_ms:.3f}" if snap.latency else "n/a",
            human(snap.size_bytes, "B"),
        )
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    frac = report.recovered_fraction  # type: ignore[attr-defined]
    drop = report.drop  # type: ignore[attr-defined]
    if lm and {"baseline", "pruned", "recovered"} <= set(s):
        line = perplexity_sentence(s["baseline"], s["pruned"], s["recovered"]).rstrip(".")
    elif not plain and {"baseline", "pruned", "recovered"} <= set(s):
        b, p, r = (s[k].accuracy for k in ("baseline", "pruned", "recovered"))
        line = f"test {metric}: baseline {b:.4f}, pruned {p:.4f}, recovered {r:.4f}"
    elif frac is None:
        line = f"pruning cost no test accuracy ({100 * -drop + 0.0:+.2f} points)"  # + 0.0: no -0.00
    elif frac > 1:
        line = f"pruning drop {100 * drop:.2f} points; recovery won back all of it and more"
    elif frac <= 0:
        line = f"pruning drop {100 * drop:.2f} points; recovery did not win any of it back"
    else:
        line = f"pruning drop {100 * drop:.2f} points; recovery won back {100 * frac:.1f}% of it"
    speed = report.prune.get("speed")  # type: ignore[attr-defined]
    if speed:
        where = "CPU" if speed.get("device", "cpu") == "cpu" else f"GPU ({speed['device']})"
        if speed.get("noisy"):
            line += f"; {where} timings too noisy for a speed-up claim (see report.md)"
        elif speed.get("shrunk", True):
            line += f"; measured {where} speed-up {speed['speedup']:.2f}x"
        line += "".join(f"; {s}" for s in speed.get("slower", []))
    console.print(line)
    console.print(f"report: {report.out_dir}/report.md")  # type: ignore[attr-defined]


def _run(recipe: str, args: argparse.Namespace) -> int:
    from regrow.pipeline import run

    report = run(
        recipe,
        overrides=args.overrides,
        out_dir=args.out,
        overwrite=args.overwrite,
        progress=not args.no_progress and not args.quiet,
        resume=args.resume,
    )
    if distributed.is_main():  # several processes (torchrun): one summary, rank 0's
        _print_summary(report)
    return 0


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the message (tests and wrappers replace it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("regrow: %(message)s"))


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    print(f"regrow: warning: {message}", file=sys.stderr)


def _configure_logging(quiet: bool) -> None:
    warnings.showwarning = _show_warning  # one line, no source location, like every other message
    logger = logging.getLogger("regrow")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`) or SIGHUP (the terminal or ssh session closed), unwound like Ctrl-C so
    that a run's partial files are cleaned up and its output folder is left as it was."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    """SIGINT as Ctrl-C, SIGTERM and SIGHUP as :class:`_Terminated`; remembered, so that a stop raised where Python
    swallows it (a ``__del__``) is raised again at the next step (regrow.errors.signalled)."""
    raise signalled(KeyboardInterrupt() if signum == signal.SIGINT else _Terminated(signum))


# SIGHUP does not exist on Windows.
_ENDING = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(quiet=args.quiet)
    in_main_thread = threading.current_thread() is threading.main_thread()
    # A signal already ignored stays ignored: `nohup regrow run ...` asked to outlive a hang-up
    previous = {
        sig: signal.signal(sig, _terminate)
        for sig in (_ENDING if in_main_thread else ())
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        return _main(args)
    finally:
        forget_stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _main(args: argparse.Namespace) -> int:
    joined = False
    try:
        if args.command in ("run", "demo", "sensitivity"):
            _set_threads(args.threads)
            joined = _join_processes(args)
        if args.command == "list":
            _print_list(args.what)
            return 0
        if args.command == "demo":
            return _run("demo", args)
        if args.command == "sensitivity":
            from regrow.pipeline import run_sensitivity

            result = run_sensitivity(
                args.recipe,
                overrides=args.overrides,
                out_dir=args.out,
                overwrite=args.overwrite,
                progress=not args.no_progress and not args.quiet,
            )
            if distributed.is_main():  # several processes: rank 0's
                print(result.markdown())
                print(f"written to {result.out_dir}/: sensitivity.json, sensitivity.png, sensitivity.md")
            return 0
        return _run(args.recipe, args)
    except RegrowError as exc:
        if args.debug:
            raise
        print(f"regrow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM or SIGHUP as _Terminated
        return _stopped(exc)
    except BrokenPipeError:  # e.g. `regrow list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except Exception as exc:
        stop = interruption(exc)
        if stop is not None:
            return _stopped(stop)
        # several processes: another rank is gone (killed, crashed, out of memory)
        if not isinstance(exc, RuntimeError) or not joined or not distributed.lost_peer(exc) or args.debug:
            raise
        print(f"regrow: error: {distributed.lost_peer_message(exc, args.resume or args.out)}", file=sys.stderr)
        return EXIT_LOST_PEER
    finally:
        if joined:
            distributed.leave()


def _stopped(exc: KeyboardInterrupt) -> int:
    """Say how the run ended and return its exit status: 130 for Ctrl-C, 128 + the signal for SIGTERM or SIGHUP."""
    if isinstance(exc, _Terminated):
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print("regrow: terminated" + (" (hang-up)" if exc.signum != signal.SIGTERM else ""), file=sys.stderr)
        return 128 + exc.signum
    print("regrow: interrupted", file=sys.stderr)
    return 130


def _join_processes(args: argparse.Namespace) -> bool:
    """Under torchrun (several processes): join the process group; ranks other than 0 show warnings and errors
    only, and no progress bars. True when this process joined a group."""
    if not distributed.init_from_env():
        return False
    if not distributed.is_main():
        args.quiet = True
        logging.getLogger("regrow").setLevel(logging.WARNING)
    return True


if __name__ == "__main__":
    sys.exit(main())
