"""The recovery training loop, in one file you can read top to bottom.

Masks are enforced without forward hooks, at almost no cost per step:

1. gradients of pruned weights are zeroed *before* ``optimizer.step()``, so no momentum or Adam moment
   ever builds up for them (their optimizer state stays exactly zero);
2. a weight that is zero, with a zero gradient and zero optimizer state, stays exactly zero under the two
   optimizers this loop builds: SGD (``d = g + wd * w = 0``, momentum ``0``) and AdamW (``w *= 1 - lr*wd``,
   update ``0 / (sqrt(0) + eps)``). The weights are re-masked once per epoch as a safety net, and
   whenever a callback changes the masks; ``strict=True`` re-masks them after every step instead (for
   an optimizer of your own).

Validation runs after every epoch. The best epoch by validation accuracy is kept in memory and restored
at the end; epoch 0 is the model as it came in, so recovery can never hand back a model worse on
validation than the one it was given, unless a callback holds the checkpoint back until it has acted (gradual
pruning until its ramp ends, RigL / SET until their first mask update); an epoch whose training or
validation loss is not finite is never kept. The divergence guard (``regrow.recovery.guard``) rolls an epoch
in which a step diverged back to its start with the learning rate lowered, a bounded number of times, then
stops the run saying why. Training
ends when the epoch budget is used, when validation has not improved for ``patience`` epochs (early
stopping; the reason says when training accuracy kept rising meanwhile, i.e. over-fitting), when the
validation accuracy is within ``stop_when.within`` points of the baseline, or when the
``stop_when.seconds`` wall-time budget runs out.

With ``ema`` set, an exponential moving average of the weights (``WeightAverage``) is kept beside the
trained weights; validation, the kept checkpoint and the returned model use the average, while training
metrics are those of the trained weights.

Callbacks (``regrow.recovery.callbacks``) may act at three points: ``on_train_start``,
``on_after_backward`` (gradients are dense and unmasked here: dynamic sparsity reads them, weight sharing
pools them), and ``on_step_end`` (after the optimizer step and the re-masking).

How the steps compute (``precision``, ``channels_last``, ``compile``) lives in ``regrow.recovery.compute``:
autocast changes the forward pass only, so the masks still act on float32 gradients and weights. The step
itself never reads a value back to the host: the training loss and accuracy are summed on the device and
read once per progress-bar refresh and once per epoch (each ``.item()`` or ``float(tensor)`` would make
the CPU wait for the GPU).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import regrow.distributed as distributed
from regrow.batches import model_device
from regrow.errors import RegrowError, raise_lost_stop
from regrow.masks import MaskEnforcer, MaskSet
from regrow.measure.metrics import classification_metrics
from regrow.objectives import Scored, as_scored, objective_of, shown
from regrow.progress import bar as progress_bar
from regrow.recovery.average import WeightAverage
from regrow.recovery.checkpoint import (
    Phase,
    Saves,
    generators,
    replay_ended,
    resume_progress,
    save_ended,
    save_progress,
)
from regrow.recovery.compute import Compute, DeviceTally, on_device
from regrow.recovery.guard import Guard, require_finite_start, save_state
from regrow.recovery.lr import LR_SCHEDULES, LRContext, OriginalSchedule
from regrow.recovery.records import EpochRecord, Kept, Patience, Position, TrainState, rank, stop_reason

log = logging.getLogger("regrow")


def make_optimizer(model: nn.Module, options: Any) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)


def _state_copy(model: nn.Module, masks: MaskSet) -> dict[str, Any]:
    """The weights and the masks together: dynamic sparsity moves masks, so a kept checkpoint needs both."""
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "masks": {k: m.clone() for k, m in masks.items()},
    }


def _restore(model: nn.Module, masks: MaskSet, state: dict[str, Any]) -> None:
    model.load_state_dict(state["weights"])
    changed = False
    for fqn, kept in state["masks"].items():
        if not torch.equal(masks[fqn], kept):
            masks[fqn].copy_(kept)
            changed = True
    if changed:
        masks.touch()


def masked_step(
    model: nn.Module,
    method: Any,
    optimizer: torch.optim.Optimizer,
    enforcer: MaskEnforcer,
    inputs: Any,
    targets: Tensor,
    *,
    after_backward: Sequence[Callable[[], None]] = (),
    grad_clip: float | None = None,
    strict: bool = False,
    compute: Compute | None = None,
    check: Callable[[Tensor, Tensor], bool] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """One optimizer step with the masks enforced; returns the named losses and the batch's ``Scored`` (its
    outputs and metric; ``regrow.objectives``), or the logits from a method that returns them.

    ``compute`` (default: fp32, no scaler) sets the autocast precision of the forward pass and, for fp16,
    scales the loss and skips a step whose gradients overflowed (``regrow.recovery.compute``). ``check``
    (the divergence guard) sees the loss and the logits after the forward pass; when it returns False the
    step is not applied (no backward pass, no optimizer step).
    """
    with compute.autocast() if compute is not None else nullcontext():
        losses, scored = method.losses(model, inputs, targets)
    if check is not None and not check(losses["loss"], _guarded(scored)):
        if distributed.active():  # DDP waits for the backward pass of every forward: one that changes nothing
            optimizer.zero_grad(set_to_none=True)
            (losses["loss"] * 0.0).backward()
            optimizer.zero_grad(set_to_none=True)
        return losses, scored
    optimizer.zero_grad(set_to_none=True)
    if compute is not None:
        compute.backward(losses["loss"], optimizer)  # fp16: unscaled again before anything reads the gradients
    else:
        losses["loss"].backward()
    for hook in after_backward:  # dense gradients: dynamic sparsity reads them, sharing pools them
        hook()
    enforcer.gradients()  # (1) pruned weights get no gradient, hence no optimizer state: one fused multiply
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if compute is not None:
        compute.step(optimizer)  # fp16: skipped, weights and state untouched, when a gradient is inf or NaN
    else:
        optimizer.step()
    if strict:  # (2) see the module docstring: SGD and AdamW cannot move a zero with no gradient or state
        enforcer.weights()
    return losses, scored


_NO_CLASSES = torch.zeros(1)  # what the guard sees of outputs that are not logits: no ln(classes) floor


def _guarded(scored: Any) -> Tensor:
    """The outputs the divergence guard judges a loss against: logits (their classes set the loss floor), else
    a one-wide placeholder (an embedding's or a custom loss has no floor)."""
    if not isinstance(scored, Scored):
        return scored
    return scored.outputs if scored.labelled else _NO_CLASSES


@dataclass
class _Run:
    """The fixed pieces of one recovery run, set up once by ``_start`` and shared by the helpers below."""

    model: nn.Module
    masks: MaskSet
    method: Any
    options: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    enforcer: MaskEnforcer
    state: TrainState
    callbacks: Sequence[Any]
    after_backward: list[Any]
    average: WeightAverage | None
    augment: Callable[[Any], Any] | None
    device: torch.device
    steps_per_epoch: int
    compute: Compute
    trained: nn.Module  # what the training steps call: the model, or its torch.compile wrapper
    guard: Guard


def _lr_scheduler(
    optimizer: torch.optim.Optimizer,
    options: Any,
    total_steps: int,
    steps_per_epoch: int,
    original: OriginalSchedule | None,
    guard: Guard,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule's learning rate at every step, as ``LambdaLR``'s factor of ``options.lr``, times the guard's
    scale (1 until a rollback lowers it; ``1.0 * x`` is exactly ``x``)."""
    warmup_steps = math.ceil(options.warmup * total_steps)
    schedule = "rewind" if options.rewind != "none" else options.lr_schedule
    lr_at = LR_SCHEDULES.get(schedule)(
        LRContext(
            total_steps,
            steps_per_epoch,
            warmup_steps,
            options.lr,
            original,  # type: ignore[arg-type]
            rewind_epoch=options.rewind_epoch,
            peak_lr=options.max_lr,
        )
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: guard.lr_scale * (lr_at(step) / options.lr))


def _start(
    model: nn.Module,
    masks: MaskSet,
    train_data: Iterable[Any],
    *,
    method: Any,
    options: Any,
    augment: Callable[[Any], Any] | None,
    callbacks: Sequence[Any],
    original: OriginalSchedule | None,
    compute: Compute,
) -> _Run:
    """Model layout, optimizer, schedule and mask enforcement; the masks applied and the callbacks started."""
    steps_per_epoch = len(train_data) if hasattr(train_data, "__len__") else sum(1 for _ in train_data)
    if steps_per_epoch == 0 and options.epochs > 0:
        raise RegrowError("the training data has no batches; recovery needs at least one (inputs, targets) batch.")
    # First: the optimizer state, the mask multipliers and the weight average take the weights' layout.
    trained = compute.prepare(model, getattr(method, "teacher", None))
    optimizer = make_optimizer(model, options)
    total_steps = max(1, options.epochs * steps_per_epoch)
    guard = Guard(options.guard, compute.device)
    scheduler = _lr_scheduler(optimizer, options, total_steps, steps_per_epoch, original, guard)
    state = TrainState(model, masks, optimizer, train_data, total_steps)
    if distributed.active():  # several processes: rank 0's masks on every rank (DDP gave it rank 0's weights)
        distributed.broadcast_masks(masks.masks)
        masks.touch()
    enforcer = MaskEnforcer(masks, model)
    masks.apply(model)
    for cb in callbacks:
        cb.on_train_start(state)
    after_backward = [cb for cb in callbacks if hasattr(cb, "on_after_backward")]
    # Created after on_train_start: a callback may set the weights there (weight sharing clusters them).
    average = WeightAverage(model, masks, options.ema) if options.ema is not None else None
    return _Run(
        model,
        masks,
        method,
        options,
        optimizer,
        scheduler,
        enforcer,
        state,
        callbacks,
        after_backward,
        average,
        augment,
        compute.device,
        steps_per_epoch,
        compute,
        trained,
        guard,
    )


def _step(run: _Run, inputs: Any, targets: Tensor) -> tuple[dict[str, Tensor], Any]:
    """One training step on a batch already on the device, then the learning rate, the step callbacks and the
    average move on; nothing moves when the guard stops the step (``run.guard.tripped``)."""
    run.guard.inputs(inputs)  # first epoch: finite inputs (the raw batch, before augmentation)
    if run.augment is not None:
        inputs = run.augment(inputs)
    inputs = run.compute.layout(inputs)

    state = run.state
    lr = run.optimizer.param_groups[0]["lr"]
    losses, scored = masked_step(
        run.trained,
        run.method,
        run.optimizer,
        run.enforcer,
        inputs,
        targets,
        after_backward=[lambda cb=cb: cb.on_after_backward(state) for cb in run.after_backward],
        grad_clip=run.options.grad_clip,
        compute=run.compute,
        # several processes: the guard judges the mean loss over the ranks, so that all take the same decision
        check=lambda loss, logits: run.guard.watch(distributed.mean(loss), logits, state.step + 1, lr),
    )
    if run.guard.tripped is not None:
        return losses, scored
    run.scheduler.step()

    state.step += 1
    version = run.masks.version
    for cb in run.callbacks:
        cb.on_step_end(state)
    if run.masks.version != version and distributed.active():
        # a callback moved the masks; one drawing random numbers (SET's regrowth, criterion random) may have moved
        # them differently on each rank once their random streams parted: every rank takes rank 0's
        distributed.broadcast_model(run.model, run.masks.masks)
        run.masks.touch()
    if run.average is not None:
        run.average.update(state.step)
    return losses, scored


def _evaluate(run: _Run, val_data: Iterable[Any], epoch: int, started: float, tally: DeviceTally) -> EpochRecord:
    """Validate the model as it is now (in the training precision); the epoch's record, with its training
    metrics from ``tally`` (read back from the device here)."""
    with run.compute.autocast():
        metrics = classification_metrics(run.model, val_data, objective=objective_of(run.method))
    sums, correct, seen = _summed(tally.read() if tally.seen else ({}, 0, 0))  # seen: samples, or real tokens
    return EpochRecord(
        epoch=epoch,
        lr=run.optimizer.param_groups[0]["lr"] if epoch else None,
        train_loss=sums["loss"] / seen if seen else None,
        train_accuracy=correct / seen if seen else None,
        val_loss=metrics["loss"],
        val_accuracy=metrics["accuracy"],
        sparsity=run.masks.sparsity(),
        seconds=time.perf_counter() - started,
        parts={k: v / seen for k, v in sums.items() if k != "loss"} if seen else {},
        step=run.state.step,
    )


def _summed(read: tuple[dict[str, float], float, int]) -> tuple[dict[str, float], float, int]:
    """A tally's sums over every rank (as they are on one process)."""
    if not distributed.active():
        return read
    sums, correct, seen = read
    names = sorted(distributed.broadcast_object(sorted(sums)))  # rank 0's loss names (a rank may have none yet)
    total = distributed.all_sum([*(sums.get(n, 0.0) for n in names), correct, seen])
    return dict(zip(names, total[:-2], strict=True)), total[-2], round(total[-1])


def _ready(run: _Run) -> bool:
    """Whether every callback has the model in its final form (e.g. gradual pruning done)."""
    return all(cb.checkpoint_ready(run.state) for cb in run.callbacks)


def _finite(record: EpochRecord) -> bool:
    """Whether the epoch's validation and training losses are finite (epoch 0 has no training loss)."""
    return math.isfinite(record.val_loss) and (record.train_loss is None or math.isfinite(record.train_loss))


def _keep_best(run: _Run, best: Kept | None, record: EpochRecord, ready: bool) -> tuple[Kept | None, bool]:
    """The kept checkpoint after ``record``'s epoch, and whether that epoch became it. An epoch whose training or
    validation loss is not finite is never kept, whatever its accuracy."""
    better = ready and _finite(record) and (best is None or rank(record) > best.key)
    if better:
        best = Kept(record.epoch, rank(record), _state_copy(run.model, run.masks))
    return best, better


def _log_epoch(record: EpochRecord, epochs: int, metric: str) -> None:
    """One line per epoch on the ``"regrow"`` logger (the command line prints it; progress bars are transient)."""
    log.info(
        "epoch %d/%d: train loss %.4f, train %s %s, val %s %s, val loss %.4f, sparsity %.2f%% (%.1f s)",
        record.epoch,
        epochs,
        record.train_loss or float("nan"),
        metric,
        shown(metric, record.train_accuracy),
        metric,
        shown(metric, record.val_accuracy),
        record.val_loss,
        100 * record.sparsity,
        record.seconds,
    )


def _finish(
    run: _Run, best: Kept | None, history: list[EpochRecord], was_training: bool, stop_reason: str
) -> dict[str, Any]:
    """Hand back the kept checkpoint, in the train/eval mode the model came in; the run's summary."""
    if best is not None:
        _restore(run.model, run.masks, best.state)
    elif run.average is not None:  # no epoch could be kept: hand back the average of the last weights
        run.model.load_state_dict(run.average.average, strict=False)
    run.model.train(was_training)
    kept = history[best.epoch] if best else history[-1]
    return {
        "best_epoch": kept.epoch,
        "best_val_accuracy": kept.val_accuracy,
        "epochs_run": history[-1].epoch,
        "steps": run.state.step,
        "stop_reason": stop_reason,
        "compute": run.compute.details(),
        "guard": run.guard.details(),
    }


def _train_epoch(run: _Run, at: Position, progress: bool, saves: Saves | None) -> DeviceTally | None:
    """Train one epoch; its training tally, or None when the guard saw a step diverge."""
    epoch = at.epoch
    run.state.epoch = epoch
    run.guard.start_epoch(epoch)
    run.model.train()
    tally = DeviceTally()
    if saves is not None:
        saves.epoch_starts()
    bar = progress_bar(
        run.state.train_data, f"recover {epoch}/{run.options.epochs}", enabled=progress, total=run.steps_per_epoch
    )
    batches = iter(bar)
    done = saves.skip_trained(run, batches, tally) if saves is not None else 0
    for inputs, targets in on_device(batches, run.device):
        losses, scored = _step(run, inputs, targets)
        raise_lost_stop()  # a signal whose stop Python swallowed (regrow.errors.signalled)
        if run.guard.tripped is not None:
            break
        tally.add(losses, as_scored(scored, targets))
        tally.show(bar)  # reads the running loss back at most once per bar refresh
        done += 1
        if saves is not None:
            saves.after_step(run, at, tally, done)
    run.guard.flush()  # the losses not read yet (off the CPU they are read every few steps)
    if run.guard.tripped is not None:
        bar.close()
        return None
    run.enforcer.weights()  # the once-per-epoch safety net
    return tally


def _begin(run: _Run, val_data: Iterable[Any], saves: Saves | None) -> Position:
    """Validate the model as it came in (epoch 0) and keep it; or, resumed, where the checkpoint left off."""
    saved = resume_progress(saves.phase, run, saves.gens) if saves else None
    if saved is not None:
        assert saves is not None
        if saved["mid"] is not None:
            saves.mid = saved["mid"] | {"rng": saved["rng"]}
        return Position.from_plain(saved["position"])
    history = [_evaluate(run, val_data, 0, time.perf_counter(), DeviceTally())]
    require_finite_start(history[0].val_loss)
    best, _ = _keep_best(run, None, history[0], _ready(run))
    return Position(history, best, Patience(lowest_loss=history[0].val_loss))


def _epochs(
    run: _Run, val_data: Iterable[Any], progress: bool, baseline_val_accuracy: float | None, saves: Saves | None
) -> tuple[list[EpochRecord], Kept | None, str]:
    """Validate the model as it came in, then train epoch by epoch until a stop reason; the records, the kept
    checkpoint and the stop reason. An epoch that diverged is rolled back and run again (``run.guard``)."""
    model, options, guard = run.model, run.options, run.guard
    at = _begin(run, val_data, saves)
    started_all = time.perf_counter() - at.seconds
    while at.reason is None and at.epoch <= options.epochs:
        saved = save_state(run) if len(guard.rollbacks) < guard.retries else None  # the last good state
        if saves is not None:
            saved = saves.saved = saved if saves.mid is None else saves.mid["saved"]
        started = time.perf_counter()
        tally = _train_epoch(run, at, progress, saves)
        if tally is not None:
            # Only a model in its final form (e.g. gradual pruning done) may become the kept checkpoint.
            ready = _ready(run)
            # With ema, validation and the kept checkpoint use the average; training metrics stay the trained weights'.
            with run.average.swapped_in(model) if run.average else nullcontext():
                record = _evaluate(run, val_data, at.epoch, started, tally)
                guard.validated(record.val_loss, run.optimizer.param_groups[0]["lr"])
                if guard.tripped is None:
                    at.best, better = _keep_best(run, at.best, record, ready)
        if guard.tripped is not None:
            guard.rollback(run, saved)  # back to the start of the epoch, learning rate lowered; or Diverged
            continue
        at.history.append(record)
        if distributed.is_main():
            _log_epoch(record, options.epochs, objective_of(run.method).metric)
        at.epoch += 1
        if ready:
            at.patience.update(record, better)
            at.reason = stop_reason(at.history, at.patience.stale, options, baseline_val_accuracy, started_all)
            at.reason = distributed.broadcast_object(at.reason)  # a time budget ends on rank 0's clock
        at.seconds = time.perf_counter() - started_all
        if saves is not None:
            save_progress(saves.phase, run, at.plain(), saves.gens)
    return at.history, at.best, at.reason or "epoch budget used"


def train(
    model: nn.Module,
    masks: MaskSet,
    train_data: Iterable[Any],
    val_data: Iterable[Any],
    *,
    method: Any,
    options: Any,
    augment: Callable[[Any], Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    original: OriginalSchedule | None = None,
    baseline_val_accuracy: float | None = None,
    phase: Phase | None = None,
) -> tuple[list[EpochRecord], dict[str, Any]]:
    """Run recovery training; returns the per-epoch records and a summary (best epoch, stop reason, and how
    the steps computed: ``"compute"``). With ``phase`` (``regrow.recovery.checkpoint``) the state is saved at
    every epoch end (and every ``every_steps`` steps) and training resumes from the phase's last checkpoint; a
    phase that had ended hands back its end state without training."""
    gens = generators(train_data, val_data)
    if phase is not None and phase.ended is not None:
        rows, summary = replay_ended(phase.ended, model, masks, callbacks, gens)
        return [EpochRecord(**h) for h in rows], summary
    saves = Saves(phase, gens) if phase is not None else None
    was_training = model.training
    progress = progress and distributed.is_main()
    compute = Compute.settle(options, model, model_device(model))
    try:
        run = _start(
            model,
            masks,
            train_data,
            method=method,
            options=options,
            augment=augment,
            callbacks=callbacks,
            original=original,
            compute=compute,
        )
        history, best, stop_reason = _epochs(run, val_data, progress, baseline_val_accuracy, saves)
        summary = _finish(run, best, history, was_training, stop_reason)
    finally:
        compute.restore()  # also when training fails: the model and teacher go back to their own layout
    if phase is not None:
        save_ended(phase, model, masks, callbacks, gens, [asdict(h) for h in history], summary)
    return history, summary
