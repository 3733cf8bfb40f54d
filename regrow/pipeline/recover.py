"""Stage 6, recover: fine-tune the pruned model (pruning further on the way when a schedule says so), then
cluster the survivors when weight sharing comes after."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regrow.masks import MaskSet
from regrow.measure.cost import count_params, dense_macs
from regrow.pipeline.context import Timer, seed_everything
from regrow.pipeline.load import Loaded
from regrow.pipeline.plan import Plan
from regrow.pipeline.prune import Pruned, Pruner
from regrow.recovery import GradualPruning, RecoveryResult, recover
from regrow.recovery.checkpoint import Checkpoints

log = logging.getLogger("regrow")


@dataclass
class Recovered:
    """The final masks, recover()'s result, the per-epoch history of the whole recovery and the report's
    recovery section."""

    masks: MaskSet
    result: RecoveryResult
    history: list[dict[str, Any]]
    info: dict[str, Any]


def recover_model(
    loaded: Loaded,
    decided: Plan,
    pruned: Pruned,
    teacher: nn.Module | None,
    timer: Timer,
    progress: bool,
    saves: Checkpoints | None = None,
) -> Recovered:
    """Recovery as the schedule says (one shot, iterative rounds, or a gradual ramp), then weight sharing; each
    training saves into ``saves``."""
    cfg = decided.cfg
    seed_everything(cfg.seed + 3)
    with timer.stage("recover"):
        if cfg.schedule.name == "iterative":
            done = recover_iterative(loaded, decided, pruned.pruner, teacher, progress, saves)
        else:
            masks = pruned.masks if pruned.masks is not None else gradual_start(loaded.model, decided)
            callbacks = [] if pruned.masks is not None else [gradual_pruning(decided)]
            kwargs = decided.recover_kwargs | ({"callbacks": callbacks} if callbacks else {})
            result = recover(
                loaded.model,
                masks,
                loaded.train,
                loaded.val,
                teacher=teacher,
                progress=progress,
                checkpoint=saves,
                **kwargs,
            )
            done = Recovered(masks, result, history_rows(result), result.to_dict())
    if cfg.recover.share.after and cfg.recover.method != "share":
        share_after(loaded, decided, done, teacher, timer, progress, saves)
    done.info["history"] = done.history
    return done


def gradual_start(model: nn.Module, decided: Plan) -> MaskSet:
    """All-True masks on the targets: the gradual ramp starts dense."""
    spec = decided.spec
    return MaskSet(
        {f: torch.ones_like(model.get_parameter(f), dtype=torch.bool) for f in spec.targets},
        spec=spec.with_sparsity(0.0),
    )


def gradual_pruning(decided: Plan) -> GradualPruning:
    """The callback that raises the sparsity along the schedule's ramp during recovery."""
    schedule, spec = decided.cfg.schedule, decided.spec
    return GradualPruning(
        final=spec.sparsity or 0.0,
        every=schedule.every,
        begin=schedule.begin,
        end=schedule.end,
        initial=schedule.initial,
        spec=spec,
    )


def recover_iterative(
    loaded: Loaded,
    decided: Plan,
    pruner: Pruner,
    teacher: nn.Module | None,
    progress: bool,
    saves: Checkpoints | None = None,
) -> Recovered:
    """k rounds of prune -> recover; the epoch budget is split evenly over the rounds."""
    model, rounds = loaded.model, decided.cfg.schedule.rounds
    kwargs = dict(decided.recover_kwargs)
    total = kwargs.pop("epochs")
    per_round = [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]
    masks: MaskSet | None = None
    history: list[dict[str, Any]] = []
    rounds_info = []
    rollbacks: list[dict[str, Any]] = []  # the divergence guard's, tagged with their round
    offset = 0
    result: RecoveryResult | None = None
    for r in range(1, rounds + 1):
        masks = pruner.step(model, previous=masks, round_index=r, rounds=rounds)
        macs_now = dense_macs(model, pruner.sample) or 0
        macs_share = macs_now / pruner.original["macs"] if pruner.original["macs"] else None
        log.info(
            "iterative round %d/%d: target sparsity %.4f, MACs %s of the original, %d epochs",
            r,
            rounds,
            masks.sparsity(),
            "n/a" if macs_share is None else f"{macs_share:.4f}",
            per_round[r - 1],
        )
        epochs = per_round[r - 1]
        result = recover(
            model,
            masks,
            loaded.train,
            loaded.val,
            teacher=teacher,
            progress=progress,
            epochs=epochs,
            checkpoint=saves,
            **kwargs,
        )
        history += history_rows(result, offset, r)
        offset += result.epochs_run
        rounds_info.append(round_info(r, masks, macs_share, model, pruner, per_round[r - 1], result))
        rollbacks += [dict(event, round=r) for event in result.details["guard"]["rollbacks"]]
    assert masks is not None and result is not None
    info = result.to_dict() | {"rounds": rounds_info, "epochs_run": offset}
    info["details"]["guard"]["rollbacks"] = rollbacks  # every round's, not only the last one's
    return Recovered(masks, result, history, info)


def round_info(
    r: int,
    masks: MaskSet,
    macs_share: float | None,
    model: nn.Module,
    pruner: Pruner,
    epochs: int,
    result: RecoveryResult,
) -> dict[str, Any]:
    """The report's line for round ``r`` of an iterative schedule."""
    return {
        "round": r,
        "sparsity": masks.sparsity() if masks.masks else None,
        "macs_of_original": macs_share,
        "params_of_original": count_params(model)[0] / pruner.original["params"],
        "epochs": epochs,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "stop_reason": result.stop_reason,
    }


def share_after(
    loaded: Loaded,
    decided: Plan,
    done: Recovered,
    teacher: nn.Module | None,
    timer: Timer,
    progress: bool,
    saves: Checkpoints | None = None,
) -> None:
    """Weight sharing after another method: cluster the survivors and fine-tune the shared values; the
    post-step's model and outcome become the run's."""
    cfg = decided.cfg
    seed_everything(cfg.seed + 5)
    with timer.stage("share"):
        skip = ("method", "epochs", "rewind", "rewind_state")
        opts = {k: v for k, v in decided.recover_kwargs.items() if k not in skip}
        shared = recover(
            loaded.model,
            done.masks,
            loaded.train,
            loaded.val,
            method="share",
            epochs=cfg.recover.share.epochs,
            teacher=teacher,
            progress=progress,
            checkpoint=saves,
            **opts,
        )
    offset = done.history[-1]["epoch"] if done.history else 0
    done.history += history_rows(shared, offset)
    done.result = merge_shared(done.result, shared, done.info, offset)


def merge_shared(result: RecoveryResult, shared: RecoveryResult, info: dict[str, Any], offset: int) -> RecoveryResult:
    """The main recovery's result and report section ``info``, with the weight-sharing post-step's outcome
    attached: the model handed back is the post-step's, so its kept epoch (numbered after the ``offset``
    epochs of the main recovery) and its validation accuracy are the run's."""
    result.shared = shared.shared
    result.details["sharing"] = shared.details.get("sharing")
    for event in shared.details.get("guard", {}).get("rollbacks", []):  # the guard's, numbered after the offset
        event = dict(event, epoch=offset + event["epoch"], phase="sharing")
        for guard in (result.details.get("guard"), info.get("details", {}).get("guard")):
            if guard is not None:
                guard["rollbacks"].append(event)
    n = shared.epochs_run
    result.stop_reason += f"; then {n} epoch{'' if n == 1 else 's'} of weight sharing ({shared.stop_reason})"
    info["sharing"] = result.details["sharing"]
    info["stop_reason"] = result.stop_reason
    info["phases"] = {"recovery": info["epochs_run"], "sharing": n}
    info["epochs_run"] = info["epochs_run"] + n
    info["steps"] = info["steps"] + shared.steps
    info["seconds"] = info["seconds"] + shared.seconds
    info["best_epoch"] = offset + shared.best_epoch
    info["best_val_accuracy"] = shared.best_val_accuracy
    if shared.best_epoch == 0:  # the history's row at ``offset`` shows the weights before they were clustered
        info["best_note"] = "the shared values right after clustering, before their fine-tuning"
    return result


def history_rows(result: RecoveryResult, offset: int = 0, round_index: int | None = None) -> list[dict[str, Any]]:
    """recover()'s per-epoch history as report rows, numbered after ``offset`` epochs (and tagged with a round)."""
    rows = []
    for h in result.to_dict()["history"]:
        if offset and h["epoch"] == 0:
            continue  # epoch 0 of a later round repeats the state after the previous round's pruning
        h = dict(h, epoch=h["epoch"] + offset)
        if round_index is not None:
            h["round"] = round_index
        rows.append(h)
    return rows
