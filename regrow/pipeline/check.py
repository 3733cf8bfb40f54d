"""Stage 2, check: what needs the real model and data, checked before anything is trained or written.

The recipe alone was checked when it was read (:mod:`regrow.config`, :mod:`regrow.checks`). Here: the pruning
request against the model (targets that match no parameter, a sparsity the pattern cannot make), an
allocation file against the model's targets or groups, a rewind checkpoint against the model's shapes, every
split against the model (its first batch run through it; then every batch: labels inside its outputs, inputs of
the first batch's kind and dtype with finite values, each new input shape run through it), augmentations against
the inputs, and a transfer run's source data.

Every batch is checked here, in one pass over each split before anything is trained or written, rather than
the first time training meets it: a bad batch late in the test split would otherwise surface only after the
baseline was trained, and one pass that reads the data and computes labels' min / max and ``isfinite`` costs
a fraction of one training epoch (which reads the same data and runs the model forward and backward).
Loaders are read through ``Unshuffled``, so the pass draws none of their shuffling randomness.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from regrow.batches import check_batch, check_batches, unpack
from regrow.components import build_augment, find_file
from regrow.config import RunConfig
from regrow.criteria import is_calibrated
from regrow.data import DataBundle
from regrow.errors import RegrowError
from regrow.patterns import get_pattern
from regrow.pipeline.context import BASELINE_WARMUP, Unshuffled
from regrow.pipeline.load import Loaded, load_source
from regrow.prune import plan
from regrow.recovery import read_rewind_state
from regrow.spec import PruneSpec
from regrow.structural import validate_request
from regrow.structural.options import check_within


@dataclass
class Checked:
    """The request as checked against the model, recover()'s keyword arguments, a transfer's source data, and the
    number of classes the model scores (its logits' last dimension on the training data)."""

    spec: PruneSpec
    structural: bool
    recover_kwargs: dict[str, Any]
    source: DataBundle | None
    classes: int | None = None


def check_inputs(loaded: Loaded) -> Checked:
    """Every check that needs the model or the data, in the order a user would fix them."""
    cfg, model, search = loaded.cfg, loaded.model, loaded.search
    spec, structural = check_request(cfg, model)
    check_allocation_file(cfg, spec, structural)
    if structural and cfg.prune.allocation_file:
        check_group_allocation(cfg, model, loaded.val)
    recover_kwargs = recover_options(cfg, search)
    if cfg.recover.rewind == "weights" and "rewind_state" in recover_kwargs:  # read and checked now, not later
        recover_kwargs["rewind_state"] = read_rewind_state(recover_kwargs["rewind_state"], model)
    # a model trained on another task (model.train.data) gets a new head for these labels
    label_range = cfg.model.train is None or cfg.model.train.data is None
    if recover_kwargs["objective"] is not None:  # an encoder's embedding: no labels to check, the model must run
        for split, data in (("train", loaded.train), ("validation", loaded.val), ("test", loaded.test)):
            check_runs(model, data, split)
        return Checked(spec, structural, recover_kwargs, load_source(cfg, search), None)
    classes: list[int] = []
    for split, data in (("train", loaded.train), ("validation", loaded.val), ("test", loaded.test)):
        with Unshuffled(data) as unshuffled:  # checking draws no shuffling randomness
            classes.append(check_batch(model, unshuffled, split, label_range=label_range))
        with Unshuffled(data) as unshuffled:  # batch indices in the order of the loader's first pass
            check_batches(model, unshuffled, split, classes=classes[-1] if label_range else None)
    check_augment(recover_kwargs.get("augment"), loaded.val)  # val: iterating it draws no shuffling randomness
    if cfg.model.train is not None:
        check_augment(build_augment(cfg.model.train.augment, search), loaded.val)
    source = load_source(cfg, search)
    if source is not None:
        for split, data in (("source training", source.train), ("source validation", source.val)):
            with Unshuffled(data) as unshuffled:
                outputs = check_batch(model, unshuffled, split)
            with Unshuffled(data) as unshuffled:
                check_batches(model, unshuffled, split, classes=outputs)
    return Checked(spec, structural, recover_kwargs, source, classes[0])


def check_runs(model: nn.Module, data: Any, split: str) -> None:
    """The first batch of ``data`` runs through ``model`` (eval mode, no gradients): data without labels."""
    from regrow.batches import _run_once

    with Unshuffled(data) as unshuffled:
        batch = next(iter(unshuffled), None)
    if batch is None:
        raise RegrowError(f"the {split} data has no batches.")
    inputs, _ = unpack(batch)
    _run_once(model, inputs, lambda failure: f"the model cannot run on a batch of the {split} data ({failure}); "
              "check the inputs' shape and keys.")  # fmt: skip


def check_request(cfg: RunConfig, model: nn.Module) -> tuple[PruneSpec, bool]:
    """The pruning request checked against the model (no tracing, no training): spec and whether structural."""
    p = cfg.prune
    pattern = p.resolved_pattern
    structural = get_pattern(pattern).structural
    if structural:
        validate_request(model, pattern, p.targets, p.ignore)
        check_within(model, p.within)
        spec = PruneSpec(pattern, p.criterion, p.scope, p.sparsity, None, [], macs=p.macs, params=p.params)
        return dataclasses.replace(spec, within=p.within), True
    spec = plan(
        model,
        p.sparsity,
        threshold=p.threshold,
        pattern=pattern,
        criterion=p.criterion,
        scope="layer"
        if p.allocation == "uniform" and p.scope == "global" and not is_calibrated(p.criterion)
        else p.scope,
        targets=p.targets,
        ignore=p.ignore,
        calibration=None if p.calibration is None else p.calibration.model_dump(),
    )
    return (spec if p.max_sparsity is None else dataclasses.replace(spec, cap=p.max_sparsity)), False


def check_allocation_file(cfg: RunConfig, spec: PruneSpec, structural: bool) -> None:
    """An allocation file must be for this pattern and, for masks, plan exactly this model's targets."""
    from regrow.allocation import Allocation

    name = cfg.prune.allocation_file
    if not name:
        return
    allocation = Allocation.load(name)
    if allocation.pattern != spec.pattern:
        raise RegrowError(
            f"allocation file {name!r} was made for pattern {allocation.pattern!r}, not {spec.pattern!r}."
        )
    if not structural and set(allocation.per_target) != set(spec.targets):
        unknown = sorted(set(allocation.per_target) - set(spec.targets))
        missing = sorted(set(spec.targets) - set(allocation.per_target))
        raise RegrowError(
            f"allocation file {name!r} does not plan this model's targets (unknown: "
            f"{unknown[:5] or 'none'}; missing: {missing[:5] or 'none'}); the targets are: "
            f"{', '.join(spec.targets[:10])}."
        )


def check_group_allocation(cfg: RunConfig, model: nn.Module, data: Any) -> None:
    """A structural allocation file names channel / head groups: check them on a copy of the model now, before
    any training (the groups depend on the architecture only, not on the weights)."""
    from regrow.allocation import Allocation
    from regrow.structural import prepare

    p = cfg.prune
    allocation = Allocation.load(p.allocation_file)  # type: ignore[arg-type]
    with Unshuffled(data) as unshuffled:
        prepared = prepare(
            copy.deepcopy(model), pattern=p.resolved_pattern, targets=p.targets, ignore=p.ignore, data=unshuffled
        )
    unknown = sorted(set(allocation.per_target) - {u.name for u in prepared.units})
    if unknown:
        raise RegrowError(
            f"allocation file {p.allocation_file!r} names groups this model does not have: {unknown[:5]}; its "
            f"groups are: {', '.join(u.name for u in prepared.active)}."
        )


def check_augment(augment: Any, data: Any) -> None:
    """Apply an augmentation to one batch now, so a mismatch with the inputs fails before any training."""
    if augment is None:
        return
    inputs, _ = unpack(next(iter(data)))
    augment(inputs)


def recover_options(cfg: RunConfig, search: list[Path]) -> dict[str, Any]:
    """recover() keyword arguments from the recipe: factories resolved, files found next to the recipe."""
    opts = cfg.recover.model_dump()
    opts["objective"] = cfg.recover.objective.build()  # None: labels
    opts["share"] = {"k": opts["share"]["k"]}  # share.after / share.epochs are the run's, not recover()'s
    opts["augment"] = build_augment(opts.pop("augment"), search)
    checkpoint = opts.pop("rewind_checkpoint")
    if checkpoint is not None:
        path = find_file(checkpoint, search)
        if not path.is_file():
            raise RegrowError(f"recover.rewind_checkpoint {checkpoint!r} does not exist.")
        opts["rewind_state"] = path
    if opts["original"] is None and cfg.model.train is not None:
        # The baseline is trained here, so the original schedule is known exactly (see TrainConfig).
        t = cfg.model.train
        opts["original"] = {"lr": t.lr, "epochs": t.epochs, "schedule": "cosine", "warmup": BASELINE_WARMUP}
    return opts
