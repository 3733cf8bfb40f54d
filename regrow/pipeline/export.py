"""Stage 8, export: weights and arch.json (no pickle), masks, shared values and the recovery curve, then the
model rebuilt from those files and checked against the recovered accuracy."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from regrow.components import build_model
from regrow.config import RunConfig
from regrow.masks import MaskSet
from regrow.measure import Snapshot
from regrow.measure.metrics import classification_metrics
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
) -> dict[str, Any]:
    """Every file of the run's model, and the reload check; returns the report's export section."""
    files = export(model, recovered.masks, spec, cfg, out, test, search, snapshot, new_classes)
    if recovered.result.shared is not None:
        recovered.result.shared.save(out / "shared.safetensors")
        files["shared"] = "shared.safetensors"
    if recovered.history:
        files["curve_plot"] = plot_curve(recovered.history, out / "curve.png", title=f"{cfg.name}: recovery").name
    return files


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
    reloaded = classification_metrics(fresh, test)["accuracy"]
    if reloaded != recovered.accuracy:
        log.warning("reloaded accuracy %.6f differs from recovered accuracy %.6f", reloaded, recovered.accuracy)
    return files | {"reload_check": {"accuracy": reloaded, "matches": reloaded == recovered.accuracy}}
