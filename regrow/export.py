"""Weights in and out as safetensors (never pickle)."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
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
        state = load_file(os.fspath(p))
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise RegrowError(f"checkpoint {str(p)!r} is not a readable safetensors file ({exc}).") from None
    try:
        missing, unexpected = _load_state(model, state)
    except Exception as exc:  # noqa: BLE001 - a module's own loading code may raise anything; say where it was
        first = str(exc).strip().splitlines() or [type(exc).__name__]
        raise RegrowError(f"checkpoint {str(p)!r} does not fit the model: {' '.join(first[:4])}.") from None
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the file: {', '.join(sorted(missing)[:8])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(sorted(unexpected)[:8])}")
        raise RegrowError(f"checkpoint {str(p)!r} does not fit the model ({'; '.join(parts)}).")
    return model


def _load_state(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """``model.load_state_dict(state, strict=False)``, with two things a safetensors file lacks: the version of
    each module's state (``_metadata``, which ``state_dict()`` writes and some modules require: torchvision's MNASNet
    refused a state without one, "version should be set to 1 or 2"), taken from the model itself, whose code wrote
    the file; and tied tensors, which the file holds once (``save_model``): a name the file lacks is not missing when
    the model's tensor of that name is one the file gives under another name."""
    own = model.state_dict(keep_vars=True)
    given = OrderedDict(state)
    given._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(given, strict=False)
    loaded = {id(own[name]) for name in state if name in own}
    return [name for name in missing if id(own[name]) not in loaded], list(unexpected)
