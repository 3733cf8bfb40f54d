"""Hugging Face out: a masked model saved as an ordinary ``save_pretrained`` folder, plus a small sidecar.

:func:`save_pretrained` writes what ``transformers`` writes (``config.json``, dense ``model.safetensors`` whose
pruned weights are exact zeros; the tokenizer's files when one is given), so ``from_pretrained`` loads it with
no regrow installed. Beside them, ``regrow_masks.safetensors`` holds the masks bit-packed (one bit per weight,
eight times smaller than booleans) and ``regrow.json`` the pruning request, the sparsity and, when given, the
run's report. :func:`load_masks` reads the masks back, e.g. to keep them during further fine-tuning.

Shrunk models (channels or heads removed) need their new widths in the Hugging Face config; they are saved with
:func:`regrow.save` for now.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from regrow.errors import RegrowError
from regrow.masks import MaskSet
from regrow.spec import PruneSpec

SIDECAR = "regrow.json"
MASKS = "regrow_masks.safetensors"


def save_pretrained(
    model: nn.Module,
    masks: MaskSet,
    folder: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    report: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save a masked Hugging Face model as ``save_pretrained`` does, plus the bit-packed masks and ``regrow.json``.

    The folder is written beside its final place and renamed into it once complete; an existing non-empty folder
    is refused unless ``overwrite`` (then replaced as a whole). A model with NaN or infinite weights is refused.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise RegrowError(
            f"regrow.hf.save_pretrained needs a Hugging Face model (one with .save_pretrained); got "
            f"{type(model).__name__}. Save other models with regrow.save."
        )
    if masks.structure is not None:
        raise RegrowError(
            "this model was shrunk (channels or heads removed); its Hugging Face config still describes the old "
            "widths, so save it with regrow.save, which records the new architecture."
        )
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise RegrowError(f"the model holds NaN or infinite weights (in {', '.join(bad[:3])}); nothing was written.")
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise RegrowError(
            f"{os.fspath(target)!r} exists and is not empty; choose another folder or pass overwrite=True."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _save_packed(masks, staging / MASKS)
        sidecar = {
            "format": "regrow.hf",
            "version": 1,
            "masks": MASKS,
            "spec": masks.spec.to_dict() if masks.spec is not None else None,
            "sparsity": masks.sparsity(),
            "report": report.to_dict() if hasattr(report, "to_dict") else report,
        }
        (staging / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _save_packed(masks: MaskSet, path: Path) -> None:
    tensors, shapes = {}, {}
    for f, m in masks.items():
        bits = np.packbits(m.detach().to("cpu", torch.bool).reshape(-1).numpy())
        tensors[f] = torch.from_numpy(bits)
        shapes[f] = list(m.shape)
    save_file(tensors, str(path), metadata={"format": "regrow.packed-masks", "shapes": json.dumps(shapes)})


def load_masks(folder: str | os.PathLike[str]) -> MaskSet:
    """The masks :func:`save_pretrained` wrote into ``folder`` (with their pruning request)."""
    path = Path(folder) / MASKS
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = json.loads((fh.metadata() or {})["shapes"])
            masks = {}
            for f, shape in shapes.items():
                bits = fh.get_tensor(f).numpy()
                count = int(np.prod(shape))
                masks[f] = torch.from_numpy(np.unpackbits(bits, count=count).astype(bool)).reshape(shape)
    except FileNotFoundError:
        raise RegrowError(
            f"{os.fspath(folder)!r} has no {MASKS}; it was not saved by regrow.hf.save_pretrained."
        ) from None
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RegrowError(f"{os.fspath(path)!r} is not a readable regrow mask file ({exc}).") from None
    spec = None
    sidecar = Path(folder) / SIDECAR
    if sidecar.is_file():
        saved = json.loads(sidecar.read_text(encoding="utf-8")).get("spec")
        spec = PruneSpec(**saved) if saved else None
    return MaskSet(masks, spec=spec)
