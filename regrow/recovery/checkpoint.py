"""Checkpoints of a run's training, and resuming a run that was killed.

A run trains in *phases*, each one call of the recovery loop: baseline training (``model.train``), a transfer
run's reference, recovery (each round of an iterative schedule is a phase), weight sharing after another
method. While a phase trains, its whole state is written at every epoch end (and every ``every_steps``
optimizer steps when that is set): weights, masks, optimizer, learning-rate schedule, gradient scaler, weight
average, the best checkpoint kept so far, the callbacks' attributes (gradual schedule, dynamic sparsity,
weight sharing; plain data only), the divergence guard, the history, and the state of every random
generator (Python, NumPy, torch on the CPU and on CUDA, and the training and validation loaders' own
generators). When the phase ends,
its end state replaces that: the weights and masks it hands back, its callbacks, the generators, and what it
returned.

Resuming replays the run from the start. The stages that do not train (loading, checks, the plan, pruning,
measuring) run again; they are deterministic, so they do what they did. A phase that had ended is not trained
again: it hands back its end state at once. The phase that was interrupted continues from its last
checkpoint. So a resumed run ends with the numbers of an uninterrupted one (equal on the CPU with the same
thread count; a GPU's kernels may differ in the last bits between processes). Two limits: a mid-epoch
checkpoint skips the batches already trained by reading them again from the loader (exact when the loader's
randomness is its sampler's or its workers', not the main process's), and the stages that do not train
(e.g. a sensitivity analysis) take their time again.

Files, in ``folder``: ``state.json`` (what started the run and where it is, for people and for the
refusals of :meth:`Checkpoints.open`) and ``phase-<i>.pt`` per phase, written atomically (temporary file,
fsync, rename). They are read with ``torch.load(weights_only=True)``: tensors, plain containers and two of
regrow's own dataclasses, nothing that runs code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import regrow.distributed as distributed
from regrow._version import __version__
from regrow.errors import RegrowError
from regrow.io import atomic_write, atomic_write_text
from regrow.recovery.compute import DeviceTally
from regrow.recovery.guard import restore_state, save_state
from regrow.recovery.sharing import SharedWeights
from regrow.spec import PruneSpec
from regrow.staging import CHECKPOINT_STATE

log = logging.getLogger("regrow")

FORMAT = 1
_SAFE = [PruneSpec, SharedWeights]  # regrow's own classes a checkpoint may hold besides tensors and containers
_PLAIN = (type(None), bool, int, float, str, torch.Tensor, torch.dtype, torch.Size, *_SAFE)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of regrow's own source files: a resumed run must run the code that started it."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def identity(config: str) -> dict[str, Any]:
    """What must be equal for a checkpoint to be resumed: the resolved config (YAML) and the code."""
    return {"format": FORMAT, "regrow": __version__, "code": code_digest(), "config": config}


# ------------------------------------------------------------------------------------------- random state


def generators(*loaders: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a loader draws its shuffling (and worker seeds) from, each once."""
    found: dict[int, torch.Generator] = {}
    for data in map(distributed.whole, loaders):  # several processes: the loader each rank's shards come from
        batch_sampler = getattr(data, "batch_sampler", None)
        for holder in (data, getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None)):
            gen = getattr(holder, "generator", None)
            if isinstance(gen, torch.Generator):
                found[id(gen)] = gen
    return list(found.values())


def rng_state(gens: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """Every random generator's state: Python, NumPy, torch (CPU and each CUDA device) and ``gens``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "loaders": [g.get_state() for g in gens],
    }
    # several processes: every rank's own (their streams part where their shards differ in size), rank 0 writes
    return state | {"ranks": distributed.per_rank(state)}


def set_rng_state(state: dict[str, Any], gens: Iterable[torch.Generator] = ()) -> None:
    """Put every generator back to ``state`` (as :func:`rng_state` took it; several processes: each rank's own)."""
    state = distributed.mine(state.get("ranks"), state)
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gens = list(gens)
    if len(gens) != len(state["loaders"]):
        raise RegrowError(
            f"the checkpoint holds {len(state['loaders'])} loader generator(s) but the data has {len(gens)}: the "
            "data factory builds other loaders than the run that wrote it. Start over with --overwrite."
        )
    for gen, saved in zip(gens, state["loaders"], strict=True):
        gen.set_state(saved)


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples where a saved state may hold lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------- checking


def _not_plain(value: Any, where: str) -> str | None:
    """Where ``value`` holds something a weights-only checkpoint cannot hold (None when it holds nothing)."""
    if isinstance(value, dict):
        for k, v in value.items():
            bad = _not_plain(k, where) or _not_plain(v, f"{where}.{k}")
            if bad:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        return next((bad for i, v in enumerate(value) if (bad := _not_plain(v, f"{where}[{i}]"))), None)
    return None if isinstance(value, _PLAIN) else f"{where} ({type(value).__name__})"


def callback_state(cb: Any) -> dict[str, Any]:
    """A callback's attributes for a checkpoint, refused unless they are plain data (tensors, numbers, strings)."""
    state = dict(vars(cb))
    bad = _not_plain(state, type(cb).__name__)
    if bad is not None:
        raise RegrowError(
            f"callback {type(cb).__name__} cannot be checkpointed: {bad} is not a tensor, a number, a string or a "
            "container of those. Keep only such attributes on the callback, or train without checkpoints."
        )
    return state


def load_callback_state(cb: Any, state: dict[str, Any]) -> None:
    vars(cb).clear()
    vars(cb).update(state)


# ------------------------------------------------------------------------------------------------ folders


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Checkpoints:
    """The checkpoints of one run in ``folder``; each call of the training loop takes the next phase."""

    def __init__(self, folder: Path, ident: dict[str, Any], *, every_steps: int | None = None) -> None:
        self.folder = Path(folder)
        self.identity = ident
        self.every_steps = every_steps
        self.writes = distributed.is_main()  # several processes: rank 0 writes, the others only read
        self._next = 0
        state = _read_state(self.folder)
        self.phases: list[dict[str, Any]] = state["phases"] if state else []

    @classmethod
    def open(cls, folder: Path, ident: dict[str, Any], *, every_steps: int | None = None) -> Checkpoints:
        """The checkpoints in ``folder`` for a resumed run, refused when another recipe or other code wrote them."""
        state = _read_state(Path(folder))
        if state is None:
            raise RegrowError(f"the checkpoint in {str(folder)!r} cannot be read; start over with --overwrite.")
        check_identity(state["identity"], ident)
        return cls(folder, ident, every_steps=every_steps)

    def phase(self, label: str, epochs: int) -> Phase:
        """The next phase of the run: resumed from its file when one was written, else started afresh."""
        index, self._next = self._next, self._next + 1
        return Phase(self, index, label, epochs)

    def _record(self, index: int, label: str, done: bool, epoch: int, epochs: int, step: int) -> None:
        entry = {"index": index, "label": label, "done": done, "epoch": epoch, "epochs": epochs, "step": step}
        self.phases = [p for p in self.phases if p["index"] < index] + [entry]
        state = {
            "identity": self.identity,
            "phases": self.phases,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_text(self.folder / CHECKPOINT_STATE, json.dumps(state, indent=1))


def check_identity(saved: dict[str, Any], ident: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written by another recipe, other code or another checkpoint format."""
    if saved.get("format") != ident["format"]:
        raise RegrowError(
            f"the checkpoint has format {saved.get('format')!r}, this regrow reads format {ident['format']}; start "
            "over with --overwrite."
        )
    if (saved.get("regrow"), saved.get("code")) != (ident["regrow"], ident["code"]):
        raise RegrowError(
            f"the checkpoint was written by regrow {saved.get('regrow')} (code {saved.get('code')}), and this is "
            f"regrow {ident['regrow']} (code {ident['code']}). A run resumed with other code would not end where "
            "the uninterrupted run would; resume with the code that started it, or start over with --overwrite."
        )
    if saved.get("config") != ident["config"]:
        raise RegrowError(
            "the checkpoint was written by a run of another recipe (resolved config, checkpoint -> now: "
            f"{config_changes(saved.get('config') or '', ident['config'])}). Resume with the recipe and --set values "
            "that started it, or start over with --overwrite."
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(before: str, after: str, shown: int = 6) -> str:
    """The keys two resolved configs (YAML) set differently, as ``key: old -> new``."""
    try:
        old, new = _flat(yaml.safe_load(before)), _flat(yaml.safe_load(after))
    except yaml.YAMLError:
        return "not readable"
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k, "(unset)") != new.get(k, "(unset)")]
    changes = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:shown]]
    return "; ".join(changes) + (f"; and {len(keys) - shown} more" if len(keys) > shown else "")


class Phase:
    """One call of the training loop: what it saved before, and where it saves next."""

    def __init__(self, owner: Checkpoints, index: int, label: str, epochs: int) -> None:
        self.owner, self.index, self.label, self.epochs = owner, index, label, epochs
        self.path = owner.folder / f"phase-{index}.pt"
        self._saved: dict[str, Any] | None = None
        if any(p["index"] == index for p in owner.phases) and self.path.exists():
            self._saved = self._load()

    @property
    def every_steps(self) -> int | None:
        return self.owner.every_steps

    def _load(self) -> dict[str, Any]:
        try:
            with torch.serialization.safe_globals(_SAFE):
                payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: pickle, zip and torch errors all end here
            raise RegrowError(
                f"checkpoint file {str(self.path)!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
                "start over with --overwrite."
            ) from None
        if payload.get("label") != self.label:
            raise RegrowError(
                f"checkpoint file {str(self.path)!r} is of phase {payload.get('label')!r}, but this run's phase "
                f"{self.index + 1} is {self.label!r}; start over with --overwrite."
            )
        return payload

    @property
    def ended(self) -> dict[str, Any] | None:
        """The end state of this phase when it had ended before (then it is not trained again)."""
        return self._saved if self._saved is not None and self._saved["kind"] == "ended" else None

    @property
    def progress(self) -> dict[str, Any] | None:
        """The state this phase was interrupted in (at an epoch end, or mid-epoch), or None."""
        return self._saved if self._saved is not None and self._saved["kind"] == "progress" else None

    def save(self, kind: str, payload: dict[str, Any], *, epoch: int, step: int) -> None:
        """Write the phase's state (``kind`` "progress" or "ended") atomically, then the run's ``state.json``."""
        if not self.owner.writes:
            return
        payload = {"kind": kind, "label": self.label, **payload}
        bad = _not_plain(payload, "checkpoint")
        if bad is not None:  # regrow's own state is always plain: this is a defect, not a user error
            raise RegrowError(f"internal error: {bad} cannot be checkpointed.")
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))
        self.owner._record(self.index, self.label, kind == "ended", epoch, self.epochs, step)
        log.debug("checkpoint: phase %d (%s) %s, epoch %d, step %d", self.index + 1, self.label, kind, epoch, step)


# ----------------------------------------------------------------------------------- the loop's state


def to_device(tree: Any, device: torch.device) -> Any:
    """``tree`` with every tensor in it moved to ``device`` (containers and ``SharedWeights`` rebuilt)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    if isinstance(tree, SharedWeights):
        return SharedWeights(tree.k, to_device(tree.indices, device), to_device(tree.codebooks, device))
    return tree


def save_progress(
    phase: Phase, run: Any, position: dict[str, Any], gens: list[torch.Generator], mid: Any = None
) -> None:
    """Save a training loop's state (``run``: the loop's ``_Run``; ``position``: its plain records, kept
    checkpoint, early-stopping count and next epoch); ``mid``: where in an epoch, for a mid-epoch checkpoint."""
    state = save_state(run, copy_tensors=False)  # written at once: no copy of the weights and optimizer state
    state["callbacks"] = [callback_state(cb) for cb in run.callbacks]  # refused here unless plain data
    payload = {
        "run": state,
        "guard": run.guard.state(),
        "position": position,
        "rng": rng_state(gens),
        "mid": mid,
    }
    phase.save("progress", payload, epoch=position["epoch"] - 1, step=run.state.step)


def resume_progress(phase: Phase | None, run: Any, gens: list[torch.Generator]) -> dict[str, Any] | None:
    """Put ``run`` back to the phase's last checkpoint; the saved payload (its ``position``, ``mid``), or None."""
    saved = phase.progress if phase is not None else None
    if saved is None:
        return None
    # read onto the CPU; the weights, masks, callbacks and kept copies go back where the run keeps them
    saved["run"] = to_device(saved["run"], run.device)
    saved["position"]["best"] = to_device(saved["position"]["best"], run.device)
    if saved["mid"] is not None:
        saved["mid"]["saved"] = to_device(saved["mid"]["saved"], run.device)
    restore_state(run, saved["run"])
    run.guard.load(saved["guard"])
    set_rng_state(saved["rng"], gens)
    assert phase is not None
    log.info("resuming %s at epoch %d, step %d", phase.label, saved["position"]["epoch"], run.state.step)
    return saved


def save_ended(
    phase: Phase,
    model: torch.nn.Module,
    masks: Any,
    callbacks: Iterable[Any],
    gens: list[torch.Generator],
    history: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    """Save what an ended phase hands on: its weights, masks, callbacks, generators and return values."""
    payload = {
        "weights": model.state_dict(),
        "masks": dict(masks.items()),
        "spec": masks.spec,
        "callbacks": [callback_state(cb) for cb in callbacks],
        "rng": rng_state(gens),
        "history": history,
        "summary": summary,
    }
    phase.save("ended", payload, epoch=summary["epochs_run"], step=summary["steps"])


@torch.no_grad()
def replay_ended(
    ended: dict[str, Any], model: torch.nn.Module, masks: Any, callbacks: Iterable[Any], gens: list[torch.Generator]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Put the model, masks, callbacks and generators where the ended phase left them; its return values."""
    model.load_state_dict(ended["weights"])
    for fqn, kept in ended["masks"].items():
        masks[fqn].copy_(kept)
    masks.touch()
    masks.spec = ended["spec"]
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    for cb, state in zip(callbacks, to_device(ended["callbacks"], device), strict=True):
        load_callback_state(cb, state)
    set_rng_state(ended["rng"], gens)
    return ended["history"], ended["summary"]


@dataclass
class Saves:
    """Checkpoints of this training (``regrow.recovery.checkpoint``): the phase, the generators of the
    loaders, and, for a checkpoint in the middle of an epoch, the epoch's start (its generators, the rollback
    state) and where an interrupted epoch resumes."""

    phase: Phase
    gens: list[torch.Generator]
    epoch_rng: dict[str, Any] | None = None
    saved: dict[str, Any] | None = None
    mid: dict[str, Any] | None = None  # a resumed mid-epoch checkpoint's place, used by the next epoch

    def epoch_starts(self) -> None:
        """Before the epoch's batches are drawn: keep the generators' state for mid-epoch checkpoints, or put back
        the state of the epoch's start when it resumes mid-epoch."""
        if self.mid is not None:
            set_rng_state(self.mid["epoch_rng"], self.gens)
        if self.phase.every_steps:
            self.epoch_rng = rng_state(self.gens)

    def skip_trained(self, run: Any, batches: Iterator[Any], tally: DeviceTally) -> int:
        """When the epoch resumes mid-epoch: read and drop the batches already trained, put the generators, the
        tally and the guard back as they were after them; the number of batches dropped."""
        if self.mid is None:
            return 0
        mid, self.mid = self.mid, None
        for _ in range(mid["batches"]):
            next(batches)
        set_rng_state(mid["rng"], self.gens)
        # several processes: each rank its own sums (resumed on another number of ranks: rank 0 all of them)
        own = distributed.mine(mid.get("tallies"), mid["tally"] if distributed.is_main() else None)
        if own is not None:
            tally.load(own, run.device)
        run.guard.load(mid["guard"])
        return int(mid["batches"])

    def after_step(self, run: Any, at: Any, tally: DeviceTally, batches: int) -> None:
        """A mid-epoch checkpoint every ``every_steps`` optimizer steps."""
        every = self.phase.every_steps
        if not every or run.state.step % every or batches == run.steps_per_epoch:
            return
        run.guard.flush()
        if run.guard.tripped is not None:
            return
        mid = {"epoch_rng": self.epoch_rng, "batches": batches, "tally": tally.state(), "saved": self.saved}
        mid["tallies"] = distributed.per_rank(to_device(tally.state(), torch.device("cpu")))
        mid |= {"rng": rng_state(self.gens), "guard": run.guard.state()}
        save_progress(self.phase, run, at.plain(), self.gens, mid)
