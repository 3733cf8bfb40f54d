"""Stage 1, load: the recipe as a validated config, the output folder checked, the data and the model built."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import regrow.distributed as distributed
from regrow.components import build_data, build_model, device_of, find_file, search_path
from regrow.config import CheckpointConfig, RunConfig, apply_overrides, load_config, settle_strategy, validate
from regrow.data import DataBundle
from regrow.data.split import split_validation
from regrow.errors import RegrowError
from regrow.io import RUN_FILES, describe, prepare_out_dir
from regrow.publish import visible
from regrow.recovery.checkpoint import Checkpoints, check_identity, identity
from regrow.staging import CHECKPOINT, CHECKPOINT_STATE, checkpoint_stages

log = logging.getLogger("regrow")
Recipe = RunConfig | Mapping[str, Any] | str | os.PathLike[str]


@dataclass
class Loaded:
    """The run's inputs: the config (files the recipe names made absolute), where its factories import from,
    the device, and the data splits and model they built (the model already on the device)."""

    cfg: RunConfig
    search: list[Path]
    device: str
    bundle: DataBundle
    train: Any
    val: Any
    test: Any
    model: nn.Module


def read_config(config: Recipe, overrides: list[str]) -> tuple[RunConfig, list[Path]]:
    """The validated config (every rule of regrow.checks applied) and the folders its factories import from."""
    cfg, recipe_path = as_config(config, overrides)
    search = search_path(recipe_path)
    return with_found_files(cfg, search), search


def check_out_dir(
    cfg: RunConfig, out_dir: str | os.PathLike[str] | None, overwrite: bool, resume: bool = False
) -> None:
    """Fail before any work if the output folder would be refused, or would replace a file the run reads; with
    ``resume``, if its checkpoint is of another recipe or other code, or there is nothing to resume."""
    if resume and not out_dir:
        raise RegrowError("--resume continues the run whose checkpoint is in --out DIR: give --out.")
    if resume:
        check_resumable(cfg, Path(out_dir))  # type: ignore[arg-type]
    if out_dir:
        # the interrupted run was allowed to replace the folder's run files: its resumption is too
        resuming = resume and Path(out_dir).is_dir() and bool(checkpoint_stages(Path(out_dir)))
        prepare_out_dir(out_dir, overwrite=overwrite or resuming, create=False, resume=resume)
        check_inputs_outside(cfg, Path(out_dir))


def identity_text(cfg: RunConfig) -> str:
    """The config a checkpoint is resumed with must be this one's; the checkpoint settings may differ."""
    return cfg.model_copy(update={"checkpoint": CheckpointConfig()}).to_yaml()


def check_resumable(cfg: RunConfig, out: Path) -> None:
    """Refuse a checkpoint in ``out`` that another recipe or other code wrote, one this run would not read
    (``checkpoint.enabled: false``), and a finished run there; warn when the thread count or torch differ."""
    stopped = checkpoint_stages(out) if out.is_dir() else []
    if stopped:
        folder = stopped[0] / CHECKPOINT
        try:
            state = json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))
            saved = state["identity"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegrowError(
                f"the checkpoint in {str(folder)!r} cannot be read ({exc}); start over with --overwrite."
            ) from None
        check_identity(saved, identity(identity_text(cfg)))
        if not cfg.checkpoint.enabled:
            raise RegrowError(
                "--resume reads the run's checkpoint, and checkpoint.enabled is false: leave it at true to resume "
                "(checkpoint.every_steps may differ), or start over with --overwrite."
            )
        now = {"threads": torch.get_num_threads(), "torch": torch.__version__}
        for key, value in now.items():
            if state.get(key, value) != value:
                log.warning(
                    "the checkpoint was written with %s %s and this run has %s: it resumes, but its numbers may "
                    "differ in the last digits from those of an uninterrupted run",
                    key,
                    state[key],
                    value,
                )
        log.info("resuming the run in %s: %s", out, describe(folder))
    elif "report.json" in visible(out):
        raise RegrowError(
            f"nothing to resume: {str(out)!r} holds a finished run and no checkpoint. Leave out --resume (with "
            "--overwrite to replace the run), or choose another --out."
        )
    else:
        log.info("no checkpoint in %s: the run starts from the beginning", out)


def checkpoints(cfg: RunConfig, stage: Path) -> Checkpoints | None:
    """The run's checkpoints in its staging folder (None when ``checkpoint.enabled`` is false); a folder taken
    over from a stopped run is checked against this run once more, now that it is locked."""
    if not cfg.checkpoint.enabled:
        return None
    folder, ident = stage / CHECKPOINT, identity(identity_text(cfg))
    every = cfg.checkpoint.every_steps
    if (folder / CHECKPOINT_STATE).is_file():
        return Checkpoints.open(folder, ident, every_steps=every)
    return Checkpoints(folder, ident, every_steps=every)


def load_data(cfg: RunConfig, search: list[Path]) -> tuple[DataBundle, Any, Any, Any]:
    """The data bundle and its train / validation / test splits (validation carved out when not given)."""
    bundle = build_data(cfg.data, search)
    train, val, test = bundle.train, bundle.val, bundle.test
    if val is None:
        train, val = split_validation(train, cfg.data.val_fraction, cfg.seed)
    return bundle, train, val, test


def load_inputs(cfg: RunConfig, search: list[Path]) -> Loaded:
    """Build the data, then the model (in that order: the model's initialisation draws after the data's)."""
    device = distributed.local_device(device_of(cfg.device))  # several processes: one GPU each
    bundle, train, val, test = load_data(cfg, search)
    model = build_model(cfg.model, search).to(device)
    # several processes: each rank reads its part of every batch (regrow.distributed)
    train, val, test = distributed.shard(train), distributed.shard(val), distributed.shard(test)
    return Loaded(cfg, search, device, bundle, train, val, test, model)


def load_source(cfg: RunConfig, search: list[Path]) -> DataBundle | None:
    """The source task's data of a transfer run (``model.train.data``), validation carved out; else None."""
    if cfg.model.train is None or cfg.model.train.data is None:
        return None
    source = build_data(cfg.model.train.data, search)
    if source.val is None:
        source.train, source.val = split_validation(source.train, cfg.model.train.data.val_fraction, cfg.seed)
    return source


def as_config(config: Recipe, overrides: list[str]) -> tuple[RunConfig, Path | None]:
    """A RunConfig from a config, a dict or a recipe path / name, with ``--set`` overrides applied."""
    if isinstance(config, RunConfig):
        strategy = config.strategy or ("auto" if config.auto() else "manual")
        config = config.model_dump(mode="json") | {"strategy": strategy}
    if isinstance(config, Mapping):
        return validate(apply_overrides(settle_strategy(dict(config)), overrides)), None
    return load_config(config, overrides)


def with_found_files(cfg: RunConfig, search: list[Path]) -> RunConfig:
    """Files the recipe names relative to its folder, made absolute: the saved config.yaml reruns from anywhere.

    Only the keys that change are replaced, so the keys a recipe set stay exactly those it set (strategy auto
    is decided from them)."""

    def found(name: str | None) -> str | None:
        path = find_file(name, search) if name else None
        return str(path.resolve()) if path is not None and path.is_file() else name

    for section, key in (("model", "checkpoint"), ("prune", "allocation_file"), ("recover", "rewind_checkpoint")):
        part = getattr(cfg, section)
        old = getattr(part, key)
        new = found(old)
        if new != old:
            cfg = cfg.model_copy(update={section: part.model_copy(update={key: new})})
    return cfg


def config_text(cfg: RunConfig, search: list[Path]) -> str:
    """config.yaml: the resolved config, headed by where its factories were imported from."""
    folders = ", ".join(json.dumps(str(f)) for f in [Path.cwd(), *search])
    return (
        "# The resolved config of this run: rerun it with `regrow run config.yaml`. Factories were imported from\n"
        f"# {folders}; run it again where they still import.\n" + cfg.to_yaml()
    )


def check_inputs_outside(cfg: RunConfig, out: Path) -> None:
    """Refuse an output folder where a finished run would replace one of the files the run reads."""
    inputs = {
        "model.checkpoint": cfg.model.checkpoint,
        "prune.allocation_file": cfg.prune.allocation_file,
        "recover.rewind_checkpoint": cfg.recover.rewind_checkpoint,
    }
    for key, name in inputs.items():
        if name is None:
            continue
        path = Path(name)
        if path.name in RUN_FILES and path.parent.resolve() == out.resolve():
            raise RegrowError(
                f"{key} {name!r} is in the output folder {str(out)!r}, and a finished run writes its own "
                f"{path.name} there, replacing the file it was given. Choose another --out, or move the file."
            )
        versions = (out / ".regrow-runs").resolve()  # earlier runs' files, removed by later publications
        if versions in path.resolve().parents:
            raise RegrowError(
                f"{key} {name!r} is inside {str(out)!r}'s earlier runs (.regrow-runs), which a run into that folder "
                "removes once it is no longer current. Copy the file elsewhere, or choose another --out."
            )
