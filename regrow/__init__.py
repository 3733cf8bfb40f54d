"""regrow: prune a trained PyTorch model, recover its accuracy by fine-tuning, report what changed.

The public API::

    masks = regrow.prune(model, 0.9)                   # zero 90% of the target weights
    result = regrow.recover(model, masks, train_loader)  # distill from the dense copy, masks enforced
    snap = regrow.evaluate(model, test_loader)           # accuracy, nonzeros, MACs, latency, size
    regrow.recover(encoder, masks, sentences, objective=regrow.Embedding())  # no labels: distil embeddings
    report = regrow.run("recipe.yaml")                   # the whole pipeline from a recipe

    regrow.prune(model, pattern="channel", macs=0.5, data=loader)  # remove channels: really faster
    regrow.save(model, "out/")                            # model.safetensors + arch.json, no pickle
    model = regrow.load("out/", factory)                  # rebuilt from the original architecture
    curves = regrow.sensitivity(model, val_loader)        # each target pruned alone: loss per level
"""

from __future__ import annotations

from regrow._version import __version__ as __version__
from regrow.accelerate import accelerate
from regrow.allocation import Allocation, allocate
from regrow.config import RunConfig, load_config
from regrow.errors import RegrowError
from regrow.export import load_weights, save_weights
from regrow.masks import MaskSet
from regrow.measure import Snapshot, evaluate
from regrow.measure.sensitivity import SensitivityResult, sensitivity
from regrow.objectives import Custom, Embedding, Labels
from regrow.pipeline import run
from regrow.prune import PruneSpec, prune
from regrow.recovery import GradualPruning, RecoveryResult, recover
from regrow.report import RunReport
from regrow.structural import StructureReport, load, save

__all__ = [
    "Allocation",
    "Custom",
    "Embedding",
    "GradualPruning",
    "Labels",
    "MaskSet",
    "PruneSpec",
    "RecoveryResult",
    "RegrowError",
    "RunConfig",
    "RunReport",
    "SensitivityResult",
    "Snapshot",
    "StructureReport",
    "accelerate",
    "allocate",
    "evaluate",
    "load",
    "load_config",
    "load_weights",
    "prune",
    "recover",
    "run",
    "save",
    "save_weights",
    "sensitivity",
]
