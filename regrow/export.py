"""Weights in and out as safetensors (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from regrow.errors import RegrowError
from regrow.io import atomic_write


def save_weights(model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict (tied tensors once) atomically to a safetensors file; ``metadata`` adds
    string key/values to the file's header."""
    meta = {"format": "pt", **(metadata or {})}
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=meta))


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> nn.Module:
    """Load a safetensors file into ``model`` in place. With ``strict=False``, tensor names found on only one
    side (the file or the model) are skipped instead of refused; shapes must still match.

    Raises:
        RegrowError: the file is missing, corrupt, or does not fit the model (names or shapes).
    """
    p = Path(path)
    if not p.is_file():
        raise RegrowError(f"checkpoint {str(p)!r} does not exist.")
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise RegrowError(
            f"checkpoint {str(p)!r} looks like a pickle file; regrow loads only safetensors (pickles can run "
            "arbitrary code). Convert it once with safetensors.torch.save_model(model, 'model.safetensors')."
        )
    try:
        missing, unexpected = load_model(model, os.fspath(p), strict=False)
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise RegrowError(f"checkpoint {str(p)!r} is not a readable safetensors file ({exc}).") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise RegrowError(f"checkpoint {str(p)!r} does not fit the model: {' '.join(first[:4])}.") from None
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the file: {', '.join(sorted(missing)[:8])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(sorted(unexpected)[:8])}")
        raise RegrowError(f"checkpoint {str(p)!r} does not fit the model ({'; '.join(parts)}).")
    return model
