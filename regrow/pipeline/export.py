"""Stage 8, export: weights and arch.json (no pickle), masks, shared values and the recovery curve, then the
model rebuilt from those files and checked against the recovered accuracy.

A model with a non-finite value (NaN or inf) in any floating-point tensor of its state dict, or in a shared
codebook, is never exported: the check runs before the first file is written, and the error discards the
run's staging folder, so the output folder stays as it was.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regrow.components import build_model
from regrow.config import RunConfig
from regrow.errors import RegrowError
from regrow.masks import MaskSet
from regrow.measure import Snapshot
from regrow.measure.metrics import classification_metrics
from regrow.objectives import Objective
from regrow.pipeline.recover import Recovered
from regrow.recovery import new_head
from regrow.report.plots import plot_curve
from regrow.spec import PruneSpec
from regrow.structural import load, save

log = logging.getLogger("regrow")


def export_model(
    model: nn.Module,
    recovered: Recovered,
    spec: PruneSpec,
    cfg: RunConfig,
    out: Path,
    test: Any,
    search: list[Path],
    snapshot: Snapshot,
    new_classes: int | None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    """Every file of the run's model, and the reload check (``objective``: what the snapshots measured); returns
    the report's export section."""
    shared = recovered.result.shared
    check_finite(model, shared.codebooks if shared is not None else {})
    files = export(model, recovered.masks, spec, cfg, out, test, search, snapshot, new_classes, objective)
    if recovered.result.shared is not None:
        recovered.result.shared.save(out / "shared.safetensors")
        files["shared"] = "shared.safetensors"
    if recovered.history:
        files["curve_plot"] = plot_curve(recovered.history, out / "curve.png", title=f"{cfg.name}: recovery").name
    if cfg.model.name == "hf":
        files["hf"] = export_hf(model, recovered.masks, cfg, out / "hf")
    return files


def export_hf(model: nn.Module, masks: MaskSet, cfg: RunConfig, folder: Path) -> dict[str, Any]:
    """A model loaded from a Hugging Face folder (model ``hf``) is also written as one (``hf/``: what
    ``from_pretrained`` reads, with the tokenizer of data ``hf_text`` or ``hf_sentences``); when its config cannot
    state a shrunk model's widths, the report says why and the regrow files stand alone."""
    from regrow.data.text import load_tokenizer
    from regrow.hf import save_pretrained

    tokenized = cfg.data.name in ("hf_text", "hf_sentences")
    tokenizer = load_tokenizer(cfg.data.kwargs["tokenizer"]) if tokenized else None
    try:
        save_pretrained(model, masks, folder, tokenizer=tokenizer, overwrite=True)
    except RegrowError as exc:
        log.info("no Hugging Face folder was written: %s", exc)  # the report says why
        return {"written": False, "why": str(exc)}
    return {"written": True, "folder": folder.name}


def check_finite(model: nn.Module, codebooks: dict[str, torch.Tensor]) -> None:
    """Refuse to export a model (or shared codebooks) holding NaN or inf, naming the tensors."""
    tensors = {**model.state_dict(), **{f"{k} (shared codebook)": v for k, v in codebooks.items()}}
    floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
    bad = [k for k, v in floating.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise RegrowError(
            f"the recovered model holds NaN or inf values in {len(bad)} of its {len(floating)} floating-point tensors "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); regrow does not export a broken model, and "
            "nothing was written. Its training diverged past the divergence guard: lower recover.lr, set "
            "recover.grad_clip, or check the data."
        )


def export(
    model: nn.Module,
    masks: MaskSet,
    spec: PruneSpec,
    cfg: RunConfig,
    out: Path,
    test: Any,
    search: list[Path],
    recovered: Snapshot,
    new_classes: int | None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    """Save weights and arch.json (regrow.save), masks if any, then reload with regrow.load and re-check."""
    meta = {"regrow.targets": json.dumps(spec.targets), "regrow.pattern": spec.pattern}
    save(model, out, overwrite=True, metadata=meta)
    files = {"model": "model.safetensors", "arch": "arch.json", "config": "config.yaml"}
    if masks.masks:
        masks.save(out / "masks.safetensors")
        files["masks"] = "masks.safetensors"

    def factory() -> nn.Module:
        fresh = build_model(cfg.model, search, load_checkpoint=False)
        if new_classes is not None:  # transfer: the saved model has the target task's head
            new_head(fresh, new_classes)
        return fresh

    fresh = load(out, factory)
    fresh.to(next(model.parameters()).device)
    reloaded = classification_metrics(fresh, test, objective=objective)["accuracy"]
    if reloaded != recovered.accuracy:
        log.warning("reloaded accuracy %.6f differs from recovered accuracy %.6f", reloaded, recovered.accuracy)
    return files | {"reload_check": {"accuracy": reloaded, "matches": reloaded == recovered.accuracy}}
