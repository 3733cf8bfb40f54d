"""``regrow.recover``: fine-tune a pruned model back to accuracy while its masks stay enforced.

More options of :func:`recover`, in detail:

* ``lr_schedule``: ``"cosine"`` (linear warm-up for ``warmup`` of the steps, then cosine to zero),
  ``"constant"`` or ``"one_cycle"`` (peak ``max_lr``, default the original training's peak).
* ``ema``: keep an exponential moving average of the weights with this decay (e.g. 0.999) and use it for
  validation, the kept checkpoint and the result (None: off). Training metrics stay those of the trained
  weights.
* ``rewind``: ``"lr"`` replays the original training's learning-rate schedule from ``rewind_epoch``
  (default: its end minus the recovery length, at least 0) to its end, more slowly when recovery is longer
  than that rest; ``"weights"`` also resets the weights to ``rewind_state`` (a state dict or safetensors
  file of the weights at that point). Replaces ``lr_schedule``.
* ``original``: the original training schedule (``OriginalSchedule`` or a dict with lr, epochs, schedule,
  warmup, milestones, gamma); default: cosine from ``lr`` over twice ``epochs``.
* ``stop_when``: ``{"within": points}`` stops once validation accuracy is within that many points of
  ``baseline_val_accuracy`` (default: the teacher's validation accuracy); ``{"seconds": s}`` is a
  wall-time budget.
* ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: autocast of the forward pass (student
  and teacher) and of validation; weights, gradients and optimizer state stay float32, so masks stay
  exact. ``"fp16"`` adds a gradient scaler and skips steps whose gradients overflow.
* ``channels_last``: ``"auto"`` (default: on for a convolutional model on a CUDA device), ``True`` or
  ``False``: the NHWC memory format for 4-D weights and inputs; the model is handed back in its own.
* ``guard``: the divergence guard (``regrow.recovery.guard``): a step whose loss is not finite or above
  ``explode_factor`` (10) times its reference rolls the epoch back with the learning rate times ``lr_factor``
  (0.5), at most ``retries`` (3) times; then :class:`Diverged` (a ``RegrowError``) stops the run.
* ``compile``: run the student's training forward through ``torch.compile`` (the first steps compile).
  Not with method ``"transfer"``, whose feature hook changes the model on every step.

``regrow.recovery.compute`` explains how these work and where the loop reads values back to the host.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

import regrow.distributed as distributed
from regrow.batches import check_reiterable, model_device
from regrow.config import RecoverConfig, explain
from regrow.data.split import split_validation
from regrow.errors import RegrowError
from regrow.masks import MaskSet
from regrow.measure.metrics import classification_metrics
from regrow.objectives import Objective, check_objective
from regrow.recovery.callbacks import GradualPruning
from regrow.recovery.checkpoint import Checkpoints
from regrow.recovery.compute import autocast, check_precision
from regrow.recovery.dynamic import DynamicSparsity
from regrow.recovery.guard import Diverged
from regrow.recovery.loop import EpochRecord
from regrow.recovery.loop import train as train_loop
from regrow.recovery.lr import OriginalSchedule, default_original, rewind_plan
from regrow.recovery.methods import METHODS, new_head, use_objective
from regrow.recovery.sharing import SharedWeights, WeightSharing, sizes

log = logging.getLogger("regrow")


@dataclass
class RecoveryResult:
    """What recovery did: the per-epoch curve, the epoch kept and why training ended.

    ``history[0]`` is the validation of the model as it came in (epoch 0: no training, so no train loss
    or learning rate). Accuracies are fractions in [0, 1]. ``details`` holds what the method adds (e.g.
    dynamic-sparsity updates, weight-sharing sizes); ``shared`` the shared weights of ``method="share"``.
    """

    history: list[EpochRecord]
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    steps: int
    stop_reason: str
    seconds: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    shared: SharedWeights | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("shared")
        out["history"] = [asdict(h) for h in self.history]
        return out


def read_rewind_state(source: Mapping[str, Tensor] | str | os.PathLike[str], model: nn.Module) -> Mapping[str, Tensor]:
    """The weight-rewinding snapshot, read (from a safetensors file) and checked against ``model``'s tensors."""
    if not isinstance(source, Mapping):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            source = load_file(os.fspath(source))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RegrowError(
                f"rewind checkpoint {os.fspath(source)!r} is not a readable safetensors file ({exc})."
            ) from None
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in source.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise RegrowError(
            "weight rewinding needs a snapshot of this model's architecture, but these tensors have other shapes: "
            f"{'; '.join(mismatched[:5])}. A model shrunk by pattern 'channel' or 'head' cannot be rewound to "
            "weights of the original shape; use rewind 'lr' for it."
        )
    if not any(k in own for k in source):
        raise RegrowError(
            f"the rewind snapshot shares no tensor name with the model (snapshot: {', '.join(list(source)[:5])}; "
            f"model: {', '.join(list(own)[:5])})."
        )
    return source


def _load_rewind_state(model: nn.Module, rewind_state: Mapping[str, Tensor] | str | os.PathLike[str]) -> None:
    """Reset the model's weights to the snapshot taken at the rewind point (masks are re-applied after)."""
    rewind_state = read_rewind_state(rewind_state, model)
    own = model.state_dict()
    with torch.no_grad():
        for k, v in rewind_state.items():
            if k in own:
                own[k].copy_(v.to(own[k].device, own[k].dtype))


@dataclass
class _Setup:
    """What :func:`recover` settles before training: validated options, data, schedule, baseline and method."""

    options: RecoverConfig
    original: OriginalSchedule
    augment: Callable[[Any], Any] | None
    train: Iterable[Any]
    val: Iterable[Any]
    baseline_val_accuracy: float | None
    rewind: dict[str, Any] | None  # what the result reports on rewinding; None without it
    runner: Any  # the method's losses
    method_callbacks: list[Any]


def _options(args: Mapping[str, Any]) -> RecoverConfig:
    """The options of :func:`recover` (``args``: its arguments by name), validated as a recipe's would be."""
    original = args["original"]
    original_cfg = None if original is None or isinstance(original, OriginalSchedule) else dict(original)
    stop_when, dynamic, share, guard = args["stop_when"], args["dynamic"], args["share"], args["guard"]
    try:
        return RecoverConfig(
            method=args["method"],
            epochs=args["epochs"],
            lr=args["lr"],
            optimizer=args["optimizer"],
            momentum=args["momentum"],
            weight_decay=args["weight_decay"],
            label_smoothing=args["label_smoothing"],
            lr_schedule=args["lr_schedule"],
            warmup=args["warmup"],
            patience=args["patience"],
            alpha=args["alpha"],
            temperature=args["temperature"],
            grad_clip=args["grad_clip"],
            ema=args["ema"],
            distill=args["distill"],
            rewind=args["rewind"],
            rewind_epoch=args["rewind_epoch"],
            original=original_cfg,
            max_lr=args["max_lr"],
            stop_when=dict(stop_when) if stop_when is not None else None,
            dynamic=dict(dynamic or {}),
            share=dict(share or {}),
            feature_weight=args["feature_weight"],
            precision=args["precision"],
            channels_last=args["channels_last"],
            compile=args["compile"],
            guard=dict(guard or {}),
        )
    except ValidationError as exc:
        raise explain(exc, "recovery options") from None


def _check_arguments(args: Mapping[str, Any], options: RecoverConfig) -> None:
    """Refuse combinations of :func:`recover`'s arguments that each pass alone but not together."""
    method, share, stop_when = args["method"], args["share"], args["stop_when"]
    if share and {"after", "epochs"} & set(share):
        raise RegrowError(
            "share.after and share.epochs are recipe settings (a run shares the weights after recovery); in "
            "Python, call regrow.recover again with method='share' after the first recovery."
        )
    if (
        method == "transfer"
        and stop_when
        and stop_when.get("within") is not None
        and args["baseline_val_accuracy"] is None
    ):
        raise RegrowError(
            "stop_when.within compares with a baseline's accuracy on the same task; the teacher of method "
            "'transfer' has the source task's head. Pass baseline_val_accuracy= (the accuracy to approach on "
            "the new task), or use stop_when.seconds."
        )
    if args["max_lr"] is not None and options.lr_schedule != "one_cycle":
        raise RegrowError(
            f"max_lr is the peak of lr_schedule 'one_cycle'; with {options.lr_schedule!r} it would be ignored. "
            "Set lr_schedule='one_cycle', or leave max_lr out."
        )
    check_precision(options.precision, args["model"], model_device(args["model"]))
    if options.compile and method == "transfer":
        raise RegrowError(
            "compile=True does not apply to method 'transfer': its feature distillation hooks the model's classifier "
            "on every step, which a compiled model cannot follow. Use compile=False, or method 'finetune'."
        )
    val_fraction = args["val_fraction"]
    if not 0.0 < val_fraction < 1.0:
        raise RegrowError(
            f"val_fraction must be in (0, 1), the share of train held out for validation; got {val_fraction!r}."
        )
    spec = args["masks"].spec
    if method in ("rigl", "set") and spec is not None and spec.pattern != "unstructured":
        raise RegrowError(
            f"method {method!r} drops and regrows single weights anywhere in a tensor, so it needs masks of pattern "
            f"'unstructured'; these have pattern {spec.pattern!r}, which it would break. Use method 'distill' or "
            "'finetune'."
        )
    if method == "share" and any(isinstance(cb, GradualPruning) for cb in args["callbacks"]):
        raise RegrowError(
            "method 'share' cannot run beside GradualPruning: sharing clusters the surviving weights once, at the "
            "start, and its clusters would bring back weights the ramp prunes later. Recover with gradual pruning "
            "first, then call recover again with method='share'."
        )


def _original_schedule(args: Mapping[str, Any], options: RecoverConfig) -> tuple[OriginalSchedule, bool]:
    """How the model was first trained, and whether that is only assumed (nothing said about it)."""
    if isinstance(args["original"], OriginalSchedule):
        return args["original"], False
    if options.original:
        return options.original.schedule_object(), False
    return default_original(args["lr"], args["epochs"]), options.original is None


def _rewind(
    args: Mapping[str, Any], options: RecoverConfig, original: OriginalSchedule, assumed: bool
) -> dict[str, Any] | None:
    """Plan the replay of the original schedule, reset the weights for ``"weights"``; what the result reports."""
    if options.rewind == "none":
        return None
    if options.lr_schedule != "cosine":
        raise RegrowError(
            f"rewind {options.rewind!r} replays the original training's learning-rate schedule, so "
            f"lr_schedule {options.lr_schedule!r} would be ignored: give one of the two."
        )
    epochs = args["epochs"]
    start, pace = rewind_plan(original, epochs, options.rewind_epoch)
    if pace < 1.0:
        log.warning(
            "rewinding: %d recovery epochs are longer than the %g epochs left of the original schedule after "
            "epoch %g; that rest is replayed %.2fx slower so that recovery ends where the original ended.",
            epochs,
            original.epochs - start,
            start,
            1.0 / pace,
        )
    if options.rewind == "weights":
        if args["rewind_state"] is None:
            raise RegrowError(
                "rewind 'weights' resets the surviving weights to a snapshot from training: pass rewind_state= "
                "(a state dict or safetensors file of the weights at the rewind point), or use rewind 'lr'."
            )
        _load_rewind_state(args["model"], args["rewind_state"])
    return {
        "kind": options.rewind,
        "original": asdict(original),
        "rewind_epoch": options.rewind_epoch,
        "start": start,
        "pace": pace,
        "assumed": assumed,
    }


def _baseline_val_accuracy(
    options: RecoverConfig, given: float | None, teacher: nn.Module | None, val: Iterable[Any], objective: Objective
) -> float | None:
    """The accuracy ``stop_when.within`` approaches: as given, else the teacher's on ``val`` (None if unused)."""
    if options.stop_when and options.stop_when.within is not None and given is None:
        if teacher is None:
            raise RegrowError(
                "stop_when.within needs the baseline's validation accuracy: pass baseline_val_accuracy= or a teacher."
            )
        with autocast(options.precision, model_device(teacher)):  # as recovery will validate
            return classification_metrics(teacher, val, objective=objective)["accuracy"]
    return given


def _set_up(args: Mapping[str, Any]) -> _Setup:
    """Check :func:`recover`'s arguments (``args``, by name) and settle everything training needs.

    The order is part of the behaviour: when several arguments are wrong, the first check to fail is reported,
    and nothing (e.g. rewinding the weights) happens after it.
    """
    options = _options(args)
    _check_arguments(args, options)
    augment = args["augment"]
    if isinstance(augment, str):
        from regrow.components import build_augment

        augment = build_augment(augment)
    if args["method"] == "transfer" and args["distill"]:
        raise RegrowError(
            "distill=True does not apply to method 'transfer': the teacher's logits are for other classes; "
            "transfer already distills features (feature_weight)."
        )
    train, val = args["train"], args["val"]
    check_reiterable(train, "train")
    if val is None:
        train, val = split_validation(train, args["val_fraction"])
    else:
        check_reiterable(val, "val")
    teacher = args["teacher"] if args["teacher"] is not None else args["masks"].dense
    original, assumed = _original_schedule(args, options)
    rewind = _rewind(args, options, original, assumed)
    objective = check_objective(args["objective"]).bind(teacher)
    baseline = _baseline_val_accuracy(options, args["baseline_val_accuracy"], teacher, val, objective)
    runner, method_callbacks = METHODS.get(args["method"])(options, teacher)
    if args["objective"] is not None:
        use_objective(runner, objective, teacher, args["method"])
    return _Setup(options, original, augment, train, val, baseline, rewind, runner, method_callbacks)


def _train(
    model: nn.Module,
    masks: MaskSet,
    setup: _Setup,
    callbacks: Sequence[Any],
    progress: bool,
    checkpoint: Checkpoints | None,
    method: str,
) -> tuple[list[EpochRecord], dict[str, Any]]:
    """Run the recovery loop (regrow.recovery.loop) with the method's callbacks before the user's, as the next
    phase of ``checkpoint`` when given."""
    o = setup.options
    label = f"{method}, {o.epochs} epoch{'' if o.epochs == 1 else 's'}, lr {o.lr:g}"
    phase = checkpoint.phase(label, o.epochs) if checkpoint else None
    return train_loop(
        model,
        masks,
        distributed.shard(setup.train),  # this rank's part of every batch (as it is on one process)
        distributed.shard(setup.val),
        method=setup.runner,
        options=setup.options,
        augment=setup.augment,
        callbacks=[*setup.method_callbacks, *callbacks],
        progress=progress,
        original=setup.original,
        baseline_val_accuracy=setup.baseline_val_accuracy,
        phase=phase,
    )


def _details(
    model: nn.Module, masks: MaskSet, setup: _Setup, history: list[EpochRecord], summary: dict[str, Any]
) -> tuple[dict[str, Any], SharedWeights | None]:
    """What the method adds to the result (``RecoveryResult.details``), and the shared weights of "share";
    taken out of the loop's ``summary``: how the steps computed (precision, channels-last, compile) and the
    divergence guard's rule and rollbacks."""
    details: dict[str, Any] = {"compute": summary.pop("compute"), "guard": summary.pop("guard")}
    shared = None
    if setup.baseline_val_accuracy is not None:
        details["baseline_val_accuracy"] = setup.baseline_val_accuracy
    for cb in setup.method_callbacks:
        if isinstance(cb, DynamicSparsity):
            kept_step = history[summary["best_epoch"]].step  # the counts describe the weights handed back
            kept = [u for u in cb.updates if u["step"] <= kept_step]
            details["dynamic"] = {
                "regrow": cb.regrow,
                "updates": len(kept),
                "weights_replaced": sum(u["replaced"] for u in kept),
                "updates_after_kept_epoch": len(cb.updates) - len(kept),
                # regrown at zero and never moved: the weights count them as pruned, the masks as kept
                "kept_zeros": sum(int((param == 0)[mask].sum()) for param, mask in masks.bind(model)),
            }
        if isinstance(cb, WeightSharing):
            cb.sync(model)  # the best checkpoint was restored: codebooks follow it
            shared = cb.shared
            details["sharing"] = sizes(model, masks, shared)
    if setup.options.ema is not None:
        details["ema"] = {"decay": setup.options.ema}
    if setup.rewind is not None:
        details["rewind"] = setup.rewind
    return details, shared


def recover(
    model: nn.Module,
    masks: MaskSet,
    train: Iterable[Any],
    val: Iterable[Any] | None = None,
    *,
    method: str = "distill",
    teacher: nn.Module | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    lr_schedule: str = "cosine",
    warmup: float = 0.05,
    patience: int | None = 5,
    alpha: float = 0.5,
    temperature: float = 2.0,
    grad_clip: float | None = None,
    ema: float | None = None,
    augment: Callable[[Any], Any] | str | None = None,
    val_fraction: float = 0.1,
    distill: bool | None = None,
    rewind: str = "none",
    rewind_epoch: float | None = None,
    rewind_state: Mapping[str, Tensor] | str | os.PathLike[str] | None = None,
    original: OriginalSchedule | Mapping[str, Any] | None = None,
    max_lr: float | None = None,
    stop_when: Mapping[str, float] | None = None,
    baseline_val_accuracy: float | None = None,
    dynamic: Mapping[str, Any] | None = None,
    share: Mapping[str, Any] | None = None,
    feature_weight: float = 0.1,
    precision: str = "fp32",
    channels_last: bool | str = "auto",
    compile: bool = False,
    guard: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    checkpoint: Checkpoints | None = None,
    objective: Objective | None = None,
) -> RecoveryResult:
    """Fine-tune a pruned model in place; masked weights stay exactly zero after every step.

    Args:
        model: the pruned model (as left by :func:`regrow.prune`).
        masks: its keep-masks (empty for a model shrunk by a structural pattern).
        train: a DataLoader or any re-iterable of ``(inputs, targets)`` batches.
        val: validation batches (early stopping, checkpoint choice); default: ``val_fraction`` of ``train``.
        method: ``"distill"`` (default), ``"finetune"``, ``"rigl"``, ``"set"``, ``"share"``, ``"transfer"``.
        teacher: the dense model for distillation and transfer; default: the frozen copy ``prune`` kept.
        epochs, lr, optimizer: training budget, peak learning rate, ``"adamw"`` (default) or ``"sgd"`` (``momentum``).
        weight_decay, label_smoothing, grad_clip: regularization.
        patience: epochs without a validation gain before stopping (None: never); the best epoch is restored.
        alpha, temperature: distillation loss ``alpha * T^2 * KL + (1 - alpha) * task loss``.
        augment: a callable applied to each training input batch, or a built-in's name (``regrow list augments``).
        distill: add the distillation loss to finetune / rigl / set / share (default: only for method
            "distill", where ``distill=False`` leaves the task loss alone); not for "transfer".
        lr_schedule, ema, rewind, original, stop_when, guard: see the module docs, ``help(regrow.recovery)``;
            also precision (``"fp32"``, ``"bf16"``, ``"fp16"``), channels_last and compile: how the steps compute.
        dynamic, share, feature_weight: rigl / set's ``update_every`` (100), ``drop_fraction`` (0.3), ``end`` (0.75);
            share's k (16); transfer's weight of the feature-distillation loss.
        callbacks, progress: step callbacks (e.g. :class:`regrow.GradualPruning`); progress bars (on a terminal).
        checkpoint, objective: resume from a run's ``Checkpoints``; labels (default), ``Embedding()``, ``Custom``.

    Returns:
        A :class:`RecoveryResult`; the model holds the best checkpoint, in the train/eval mode it came in.

    Example:
        >>> masks = regrow.prune(model, 0.9)
        >>> result = regrow.recover(model, masks, train_loader, epochs=5)
        >>> result.best_val_accuracy  # doctest: +SKIP
    """
    setup = _set_up(locals())  # the arguments by name: first, so that locals() holds nothing else
    started = time.perf_counter()
    history, summary = _train(model, masks, setup, callbacks, progress, checkpoint, method)
    details, shared = _details(model, masks, setup, history, summary)  # takes "compute" and "guard" out of the summary
    seconds = time.perf_counter() - started
    return RecoveryResult(history=history, seconds=seconds, method=method, details=details, shared=shared, **summary)


__all__ = ["Diverged", "GradualPruning", "METHODS", "OriginalSchedule", "RecoveryResult", "new_head", "recover"]
