"""The divergence guard of the training loop: a diverging step is never kept.

The rules (the numbers are the defaults of ``guard=``, ``recover.guard`` in a recipe; baseline training
(``model.train``) runs under the same guard):

* **Divergence.** A training step diverges when its loss is not finite (NaN or inf), or when it is above
  ``explode_factor`` (10) times the reference: the larger of the median of the last ``WINDOW`` (20) accepted
  step losses of the run and ln(classes), the loss of a uniform guess. The floor keeps a well-trained
  model's tiny losses from looking like an explosion: on the shipped recipes one hard batch reaches 65 times
  a window's median of 0.02. Measured on all 12,908 steps of the 15 shipped digits recipes (baseline
  training and recovery), no step reaches 1.91 times its reference, while a learning rate of 1 or 1000
  sends the loss from 1.3 to 126 or 2e13 at the second step (55 and 1e13 times). The first step of a run has
  no reference, so only its finiteness is judged. An epoch whose validation loss is not finite diverged too.
* **Rollback.** The epoch that diverged is rolled back to its start: weights, masks, optimizer state, the
  position in the learning-rate schedule, the weight average, the gradient scaler, the callbacks' attributes
  and the guard's own window are put back as they were, the learning rate (the whole schedule from then on)
  is multiplied by ``lr_factor`` (0.5), and the epoch runs again. After ``retries`` (3) rollbacks in one run,
  the next divergence stops the run with :class:`Diverged` (a :class:`RegrowError`): one paragraph saying
  what diverged, when, the rollbacks made and what to try. Every rollback is recorded with its epoch, step,
  cause and learning rate before and after (``RecoveryResult.details["guard"]``).
* **Bad inputs** are a data error, not divergence: during the first epoch the loop checks that every
  training batch's floating-point inputs are finite and stops at once, naming the batch.
* **When.** On the CPU a step's loss is read right after its forward pass, so a diverging step is never
  applied (reading costs nothing there). On a GPU each read makes the CPU wait for the device, so the losses
  are read every ``READ_EVERY`` (50) steps and at the end of each epoch; the steps run past a divergence
  before it is read are rolled back with the rest of their epoch, so the outcome is the same.
* **Cost.** The state at the start of each epoch is kept on the weights' device: a copy of the weights, the
  optimizer state (two more copies for AdamW) and the weight average. ``retries=0`` keeps no copy and stops
  at the first divergence.
* A step skipped by the fp16 gradient scaler (its gradients overflowed, its loss was finite) is not
  divergence: the scaler handles it (``regrow.recovery.compute``).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regrow.batches import tensors
from regrow.errors import RegrowError

log = logging.getLogger("regrow")

WINDOW = 20  # the reference is the median of this many last accepted step losses
READ_EVERY = 50  # off the CPU, steps between reads of the step losses (one host sync each)


def all_finite(x: Any) -> Tensor | None:
    """Whether every floating-point value of ``x`` is finite, as a boolean tensor on its device (None: none)."""
    flags = [torch.isfinite(t).all() for t in tensors(x) if t.is_floating_point() or t.is_complex()]
    if not flags:
        return None
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def explode_reference(window: Any, classes: int) -> float:
    """The larger of the median of the accepted losses in ``window`` and ln(classes) (the loss of a uniform
    guess; no floor for a single output)."""
    median = statistics.median(window)
    return max(median, math.log(classes)) if classes > 1 else median


def judge(loss: float, window: Any, classes: int, explode_factor: float | None) -> str | None:
    """Why a step with this loss diverged, or None: not finite, or above ``explode_factor`` x the reference."""
    if not math.isfinite(loss):
        return f"the training loss was {loss}"
    if explode_factor is None or not window:
        return None
    reference = explode_reference(window, classes)
    if loss > explode_factor * reference:
        floor = f"ln {classes} = {math.log(classes):.4g}, a uniform guess's loss" if classes > 1 else "no floor"
        return (
            f"the training loss {loss:.4g} was above {explode_factor:g} x the reference {reference:.4g} (the larger "
            f"of the median of the last {len(window)} step losses, {statistics.median(window):.4g}, and {floor})"
        )
    return None


def require_finite_start(val_loss: float) -> None:
    """Epoch 0 (the model as it came in) must validate to a finite loss, or no checkpoint can be chosen by it."""
    if not math.isfinite(val_loss):
        raise RegrowError(
            f"the validation loss of the model as it came in is {val_loss}: the validation data is empty or holds "
            "non-finite values, or the model's weights do (e.g. a broken checkpoint). Recovery cannot choose a "
            "checkpoint by it; check the data and the weights."
        )


RECOVERY_ADVICE = (
    "Try a lower learning rate (recover.lr; lr= in Python), a gradient clip (recover.grad_clip), or check the data "
    "and the augmentation for extreme values"
)


class Diverged(RegrowError):
    """Training diverged again after the guard's rollbacks were used up (or it had none)."""

    def __init__(self, event: dict[str, Any], rollbacks: list[dict[str, Any]], retries: int) -> None:
        self.event, self.rollbacks, self.retries = event, rollbacks, retries
        super().__init__(self.explain("recovery", RECOVERY_ADVICE))

    def explain(self, training: str, advice: str) -> str:
        """The paragraph for ``training`` (e.g. "baseline training (model.train)"), ending with ``advice``."""
        e = self.event
        where = f"at epoch {e['epoch']}" + (
            f", step {e['step']} (batch {e['batch']} of the epoch, counting from 0)" if e.get("step") else ""
        )
        if self.rollbacks:
            n = len(self.rollbacks)
            tried = (
                f"It had been rolled back to the start of its epoch {n} time{'s' if n > 1 else ''} before, each "
                f"time with the learning rate multiplied by {self.rollbacks[0]['lr_factor']:g} (the whole schedule now "
                f"x{self.rollbacks[-1]['lr_scale']:g}, {e['lr']:.4g} at that step), and diverged again."
            )
        else:
            tried = "The guard had no retry left (recover.guard.retries is 0)."
        return (
            f"{training} diverged {where}: {e['cause']}. {tried} Nothing was exported. {advice}; recover.guard sets "
            "the guard's explode_factor, retries and lr_factor."
        )


@dataclass
class _Pending:
    """A step whose loss (on the device) is not yet read back."""

    batch: int
    step: int
    lr: float
    loss: Tensor
    inputs_ok: Tensor | None
    classes: int


class Guard:
    """The divergence guard of one training run (see the module docs for the rules)."""

    def __init__(self, options: Any, device: torch.device) -> None:
        self.explode_factor: float | None = options.explode_factor
        self.retries: int = options.retries
        self.lr_factor: float = options.lr_factor
        self.every = 1 if device.type == "cpu" else READ_EVERY
        self.lr_scale = 1.0  # the learning-rate schedule's factor, lowered by each rollback
        self.window: deque[float] = deque(maxlen=WINDOW)
        self.rollbacks: list[dict[str, Any]] = []
        self.tripped: dict[str, Any] | None = None
        self.epoch = 0
        self._batch = -1
        self._pending: list[_Pending] = []
        self._inputs_ok: Tensor | None = None

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self._batch, self.tripped, self._pending = epoch, -1, None, []

    def inputs(self, inputs: Any) -> None:
        """Before a step of the first epoch: whether the batch's inputs are finite (kept on the device)."""
        self._inputs_ok = all_finite(inputs) if self.epoch == 1 else None

    def watch(self, loss: Tensor, logits: Tensor, step: int, lr: float) -> bool:
        """After a step's forward pass: record its loss; False when the step must not be applied."""
        self._batch += 1
        self._pending.append(_Pending(self._batch, step, lr, loss.detach(), self._inputs_ok, logits.shape[-1]))
        if len(self._pending) >= self.every:
            self.flush()
        return self.tripped is None

    def flush(self) -> None:
        """Read the pending step losses back (one host sync) and judge them in order."""
        pending, self._pending = self._pending, []
        if not pending or self.tripped is not None:
            return
        losses = torch.stack([p.loss.float().reshape(()) for p in pending]).tolist()
        flags = [p.inputs_ok for p in pending if p.inputs_ok is not None]
        finite = iter(torch.stack(flags).tolist() if flags else [])
        for p, loss in zip(pending, losses, strict=True):
            if p.inputs_ok is not None and not next(finite):
                raise RegrowError(
                    f"training batch {p.batch} (counting from 0, in this epoch's order) has non-finite inputs (NaN or "
                    "inf), which no learning rate can train on; fix the data (or the data factory)."
                )
            cause = judge(loss, self.window, p.classes, self.explode_factor)
            if cause is not None:
                self.tripped = {"epoch": self.epoch, "step": p.step, "batch": p.batch, "cause": cause, "lr": p.lr}
                return
            self.window.append(loss)

    def validated(self, val_loss: float, lr: float) -> None:
        """After an epoch's validation: a non-finite validation loss is divergence too."""
        if not math.isfinite(val_loss):
            cause = f"the validation loss after the epoch was {val_loss}"
            self.tripped = {"epoch": self.epoch, "step": None, "batch": None, "cause": cause, "lr": lr}

    def rollback(self, run: Any, saved: dict[str, Any] | None) -> None:
        """Put ``run`` back to ``saved`` (the start of the epoch that diverged) with the learning rate lowered;
        raises :class:`Diverged` when no retry is left."""
        event = self.tripped
        assert event is not None
        if saved is None or len(self.rollbacks) >= self.retries:
            raise Diverged(event, self.rollbacks, self.retries)
        restore_state(run, saved)
        self.window = deque(saved["window"], maxlen=WINDOW)
        before = self.lr_scale
        self.lr_scale = before * self.lr_factor
        scheduler = run.scheduler
        groups = run.optimizer.param_groups
        for group, base, lr_at in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * lr_at(scheduler.last_epoch)  # as LambdaLR sets it, with the new scale inside
        scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
        record = event | {
            "lr_before": event["lr"],
            "lr_after": event["lr"] * self.lr_factor,
            "lr_factor": self.lr_factor,
            "lr_scale": self.lr_scale,
        }
        del record["lr"]
        self.rollbacks.append(record)
        self.tripped = None
        log.warning(
            "divergence guard: epoch %d diverged (%s); rolled back to its start, learning rate x%g (now x%g)",
            event["epoch"],
            event["cause"],
            self.lr_factor,
            self.lr_scale,
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the guard (its pending losses read first): scale, rollbacks, window, batch."""
        self.flush()
        window = list(self.window)
        return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "window": window, "batch": self._batch}

    def load(self, state: dict[str, Any]) -> None:
        self.lr_scale, self.rollbacks = state["lr_scale"], list(state["rollbacks"])
        self.window = deque(state["window"], maxlen=WINDOW)
        self._batch = state["batch"]

    def details(self) -> dict[str, Any]:
        """What the result and the report say about the guard: its rule and every rollback."""
        return {
            "explode_factor": self.explode_factor,
            "window": WINDOW,
            "retries": self.retries,
            "lr_factor": self.lr_factor,
            "rollbacks": list(self.rollbacks),
        }


def _shared(run: Any) -> dict[int, Any]:
    """A deepcopy memo that keeps the run's own objects shared: a callback's copy refers to the same model,
    masks and optimizer, and only its own attributes are copied."""
    teacher = getattr(run.method, "teacher", None)
    kept: list[Any] = [run.model, run.masks, run.optimizer, run.state, run.state.train_data, run.method, run.compute]
    for module in (run.model, teacher):
        if module is not None:
            kept += [module, *module.parameters(), *module.buffers()]
    kept += list(run.masks.masks.values())
    return {id(o): o for o in kept}


def _callback_state(run: Any, cb: Any) -> dict[str, Any] | None:
    """A copy of a callback's attributes, or None when they cannot be copied (a lock, an open file)."""
    try:
        return copy.deepcopy(vars(cb), _shared(run))
    except (TypeError, copy.Error):
        return None


def save_state(run: Any, *, copy_tensors: bool = True) -> dict[str, Any]:
    """Everything an epoch changes, as it is now: the state a rollback returns to. ``copy_tensors=False``
    refers to the run's own tensors and the callbacks' own attributes instead of copying them (for a checkpoint
    written at once)."""
    scaler = run.compute.scaler
    own = (lambda t: t.detach().clone()) if copy_tensors else (lambda t: t.detach())
    again = copy.deepcopy if copy_tensors else (lambda x: x)
    return {
        "weights": {k: own(v) for k, v in run.model.state_dict().items()},
        "masks": {k: own(m) for k, m in run.masks.items()},
        "spec": run.masks.spec,
        "optimizer": again(run.optimizer.state_dict()),
        "scheduler": copy.deepcopy(run.scheduler.state_dict()),
        "step": run.state.step,
        "average": {k: own(v) for k, v in run.average.average.items()} if run.average is not None else None,
        "scaler": (scaler.state_dict(), run.compute.skipped_steps, run.compute._scale) if scaler is not None else None,
        "callbacks": [_callback_state(run, cb) if copy_tensors else dict(vars(cb)) for cb in run.callbacks],
        "window": list(run.guard.window),
    }


@torch.no_grad()
def restore_state(run: Any, saved: dict[str, Any]) -> None:
    """Put the run back to ``saved`` (copies again: one saved state may be restored more than once)."""
    run.model.load_state_dict(saved["weights"])
    changed = False
    for fqn, kept in saved["masks"].items():
        if not torch.equal(run.masks[fqn], kept):
            run.masks[fqn].copy_(kept)
            changed = True
    if changed:
        run.masks.touch()
    run.masks.spec = saved["spec"]
    run.optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    run.scheduler.load_state_dict(copy.deepcopy(saved["scheduler"]))
    run.state.step = saved["step"]
    if saved["average"] is not None:
        for k, v in saved["average"].items():
            run.average.average[k].copy_(v)
    if saved["scaler"] is not None:
        state, skipped, scale = saved["scaler"]
        run.compute.scaler.load_state_dict(state)
        run.compute.skipped_steps, run.compute._scale = skipped, scale
    for cb, attributes in zip(run.callbacks, saved["callbacks"], strict=True):
        if attributes is None:
            log.warning("divergence guard: %s's attributes cannot be copied; it keeps its state", type(cb).__name__)
            continue
        vars(cb).clear()
        vars(cb).update(copy.deepcopy(attributes, _shared(run)))
