"""``regrow.run``: one run, read as its stages.

    load -> check -> baseline -> plan -> prune -> recover -> measure -> export -> (accelerate) -> report

Each stage is a function in the module named after it, with typed inputs and outputs: :mod:`.load`
(``Loaded``), :mod:`.check` (``Checked``), :mod:`.baseline` (``Baseline``), :mod:`.plan` (``Plan``),
:mod:`.prune` (``Pruned``), :mod:`.recover` (``Recovered``), :mod:`.measure` (``Snapshots`` and the latency
pair), :mod:`.export` and :mod:`.report`. What a recipe may say is checked when it is read
(:mod:`regrow.config`, :mod:`regrow.checks`); what needs the model and the data, by the check stage, before
anything is trained or written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import regrow.distributed as distributed
from regrow.io import atomic_write_text, prepare_out_dir, staged_out_dir
from regrow.pipeline.accelerate import accelerate_model
from regrow.pipeline.baseline import set_baseline, train_baseline
from regrow.pipeline.check import check_inputs, check_request
from regrow.pipeline.context import Timer, default_out_dir, reproducible_kernels, seed_everything
from regrow.pipeline.export import export_model
from regrow.pipeline.load import (
    Recipe,
    check_out_dir,
    checkpoints,
    config_text,
    load_inputs,
    load_source,
    read_config,
)
from regrow.pipeline.measure import Snapshots, compare_speed
from regrow.pipeline.plan import make_plan, sensitivity
from regrow.pipeline.prune import prune_model
from regrow.pipeline.recover import recover_model
from regrow.pipeline.report import build_report
from regrow.report import RunReport

__all__ = ["reproducible_kernels", "run", "run_sensitivity", "seed_everything"]


@reproducible_kernels
def run(
    config: Recipe,
    *,
    overrides: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> RunReport:
    """Run the whole pipeline from a typed config, a dict, or a recipe path / built-in recipe name.

    Writes into ``out_dir`` (default ``runs/<name>-<timestamp>``; a non-empty folder is refused unless
    ``overwrite``): ``config.yaml``, ``report.json``, ``report.md``, ``curve.png``,
    ``model.safetensors`` (masks squashed in), ``masks.safetensors`` and ``arch.json``, and when they
    apply ``sensitivity.json`` / ``.png``, ``allocation.json`` and ``shared.safetensors`` (README, "What a
    run writes"). The files appear there only when the run succeeds; a run that fails leaves the folder as it
    was, but for the checkpoint of an interrupted run, which ``resume`` continues (same recipe, same code;
    ``regrow.recovery.checkpoint``). ``overrides`` are ``"key.sub=value"`` strings, as with ``regrow run
    --set``; ``progress`` shows progress bars (on a terminal only).
    """
    cfg, search = read_config(config, overrides or [])  # every rule of regrow.checks applied
    if distributed.is_main():  # several processes: only rank 0 writes (the others into a private folder)
        check_out_dir(cfg, out_dir, overwrite, resume)
    timer = Timer()
    seed_everything(cfg.seed)
    with timer.stage("load"):
        loaded = load_inputs(cfg, search)
        checked = check_inputs(loaded)
    # Everything the user gave has been checked; only now is anything written, and into a staging folder:
    # the files replace those of an earlier run only once this run has succeeded.
    final = Path(out_dir) if out_dir else default_out_dir(cfg.name)
    with distributed.out_folder(final, staged_out_dir, overwrite=overwrite, resume=resume) as out:
        atomic_write_text(out / "config.yaml", config_text(cfg, search))
        saves = checkpoints(cfg, out)  # each training phase saves its state here, and resumes from it
        snapshots = Snapshots(loaded.test, cfg.evaluate, timer, progress, checked.recover_kwargs["objective"])
        base = set_baseline(loaded, checked, snapshots, timer, progress, saves)
        snapshots.reference = base.teacher  # an embedding is measured against the dense model from here on
        decided = make_plan(loaded, checked, base.teacher is not None, out, timer, progress)
        pruned = prune_model(loaded, decided, snapshots, timer)
        recovered = recover_model(loaded, decided, pruned, base.teacher, timer, progress, saves)
        result = snapshots.take(loaded.model, "recovered", decided.spec.targets)
        speed = compare_speed(
            base.teacher, loaded.model, loaded.test, cfg.evaluate, loaded.device, decided.structural, timer
        )
        with timer.stage("export"):
            files = export_model(
                loaded.model,
                recovered,
                decided.spec,
                decided.cfg,
                out,
                loaded.test,
                search,
                result,
                base.classes,
                snapshots.bound(loaded.model),
            )
        acceleration = accelerate_model(loaded, decided, recovered.masks, timer)
        report = build_report(
            loaded, decided, base, pruned, recovered, snapshots, speed, acceleration, files, timer, final
        )
        report.write(out)
    return report


@reproducible_kernels
def run_sensitivity(
    config: Recipe,
    *,
    overrides: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """Only the sensitivity analysis of a recipe (baseline trained first if the recipe says so).

    With ``model.train.data`` (a transfer recipe) the model is trained and measured on that source data,
    where its classifier applies. Writes ``sensitivity.json``, ``sensitivity.png`` and ``sensitivity.md``
    into ``out_dir``.
    """
    cfg, search = read_config(config, overrides or [])
    if out_dir and distributed.is_main():
        prepare_out_dir(out_dir, overwrite=overwrite, create=False)
    seed_everything(cfg.seed)
    loaded = load_inputs(cfg, search)
    spec, _ = check_request(cfg, loaded.model)
    train, val = loaded.train, loaded.val
    source = load_source(cfg, search)
    if source is not None:
        # A transfer recipe: the model is trained on the source task and its head only fits that task, so
        # it is measured there (a run measures it again on the target task after giving it a new head).
        train, val = source.train, source.val
    final = Path(out_dir) if out_dir else default_out_dir(f"{cfg.name}-sensitivity")
    with distributed.out_folder(final, staged_out_dir, overwrite=overwrite) as out:
        if cfg.model.train is not None:
            seed_everything(cfg.seed + 1)
            train_baseline(cfg, loaded.model, train, val, search, progress)
        result = sensitivity(cfg, loaded.model, spec, val, progress)
        result.save(out / "sensitivity.json")
        result.plot(out / "sensitivity.png")
        atomic_write_text(
            out / "sensitivity.md",
            f"# Sensitivity: {cfg.name}\n\n" + result.markdown() + "\n\n![sensitivity](sensitivity.png)\n",
        )
    result.out_dir = str(final)  # type: ignore[attr-defined]
    return result
