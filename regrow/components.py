"""Building the model, data and augmentation a recipe names: built-ins or ``package.module:function``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from regrow.config import ComponentConfig, DataConfig, ModelConfig
from regrow.data import DATASETS, DataBundle, as_bundle
from regrow.data.augment import AUGMENTS
from regrow.errors import RegrowError
from regrow.export import load_weights
from regrow.models import MODELS


def importable(folders: list[Path]) -> None:
    """Make ``folders`` importable *after* the standard library and installed packages (appended to
    ``sys.path``): a file there named like one of those (``colorsys.py``, ``matplotlib.py``) never replaces
    it, for regrow or for anything it imports later. They stay on the path for the rest of the process, as a
    script's own folder does: a factory that imports its helpers when called, and data-loader workers started
    with spawn or forkserver, find them there too. (Folders already on the path are left where they are;
    ``python -m`` and ``python -c`` put the working directory first by themselves, the ``regrow`` command
    does not.)"""
    for folder in dict.fromkeys(str(f) for f in folders):
        if folder not in sys.path:
            sys.path.append(folder)


def _shadowed(module: Any, module_name: str, folders: list[Path]) -> str:
    """Why a module was found elsewhere than the user's file of the same name, or ``""``."""
    top = module_name.partition(".")[0]
    mine = [f for f in folders if (f / f"{top}.py").is_file() or (f / top / "__init__.py").is_file()]
    origin = getattr(module, "__file__", None) or "built into Python"
    if not mine or any(str(origin).startswith(str(f)) for f in mine):
        return ""
    return (
        f" {module_name!r} is the standard library's or an installed package's ({origin}), not {top!r} in "
        f"{mine[0]}: the recipe's folder and the working directory come after those on the import path, so "
        "that a file there never replaces them. Rename your module."
    )


def import_factory(spec: str, what: str, search: list[Path] | None = None) -> Callable[..., Any]:
    """Resolve ``"package.module:function"``; the working directory and ``search`` folders are importable,
    after the standard library and installed packages (:func:`importable`). A recipe's factories are code
    that regrow runs: a recipe is trusted like a Python script (README, "Trust")."""
    module_name, _, attr = spec.partition(":")
    folders = [Path.cwd(), *(search or [])]
    importable(folders)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise RegrowError(
                f"{what} factory {spec!r}: module {module_name!r} cannot be found (no module named "
                f"{exc.name!r}); check the spelling, and that the module is installed or sits in the "
                "working directory or next to the recipe."
            ) from None
        raise RegrowError(f"{what} factory {spec!r}: importing {module_name!r} failed: {exc}.") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise RegrowError(
            f"{what} factory {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}."
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        public = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and inspect.isfunction(v)
        )
        raise RegrowError(
            f"{what} factory {spec!r}: module {module_name!r} has no function {attr!r}; "
            f"its functions are: {', '.join(public) or 'none'}.{_shadowed(module, module_name, folders)}"
        )
    return fn


def _call(fn: Callable[..., Any], kwargs: dict[str, Any], label: str) -> Any:
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise RegrowError(
            f"{label}: the kwargs {sorted(kwargs)} do not fit its signature {inspect.signature(fn)} ({exc})."
        ) from None
    except ValueError:
        pass  # builtins without a signature: let the call decide
    try:
        return fn(**kwargs)
    except RegrowError:
        raise
    except Exception as exc:  # noqa: BLE001 - report the user's factory failure in one line
        raise RegrowError(f"{label} raised {type(exc).__name__}: {exc}.") from exc


def _resolve(cfg: ComponentConfig, registry: Any, what: str, search: list[Path]) -> tuple[Callable[..., Any], str]:
    if cfg.factory is not None:
        return import_factory(cfg.factory, what, search), f"{what} factory {cfg.factory!r}"
    return registry.get(cfg.name), f"built-in {what} {cfg.name!r}"


def build_model(cfg: ModelConfig, search: list[Path] | None = None, *, load_checkpoint: bool = True) -> nn.Module:
    """Call the model factory and load the checkpoint, if any. Does not train."""
    fn, label = _resolve(cfg, MODELS, "model", search or [])
    model = _call(fn, cfg.kwargs, label)
    if not isinstance(model, nn.Module):
        raise RegrowError(f"{label} returned {type(model).__name__}; it must return a torch.nn.Module.")
    if load_checkpoint and cfg.checkpoint:
        load_weights(model, find_file(cfg.checkpoint, search))
    return model


def find_file(name: str, search: list[Path] | None = None) -> Path:
    """A file named in a recipe: absolute, or relative to the recipe's folder (the ``search`` folders) if it
    is there, else to the working directory. Returned as given when found nowhere, for the caller's error.
    A name that means two different files (one next to the recipe, one in the working directory) is an error."""
    path = Path(name)
    if path.is_absolute():
        return path
    beside = next((s / path for s in search or [] if (s / path).exists()), None)
    if beside is None:
        return path
    if path.exists() and not path.resolve().samefile(beside):
        raise RegrowError(
            f"{name!r} names two different files: {beside} (next to the recipe) and {path.resolve()} (in the "
            "working directory); give an absolute path."
        )
    return beside


def build_data(cfg: DataConfig, search: list[Path] | None = None) -> DataBundle:
    fn, label = _resolve(cfg, DATASETS, "data", search or [])
    return as_bundle(_call(fn, cfg.kwargs, label), label)


def build_augment(spec: str | None, search: list[Path] | None = None) -> Callable[[Any], Any] | None:
    """A built-in augmentation name (``regrow list augments``), ``"package.module:function"``, or none."""
    if spec is None or spec == "none":
        return None
    if ":" in spec:
        return import_factory(spec, "augment", search)
    return AUGMENTS.get(spec)


def device_of(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RegrowError(f"device {name!r} was asked for but CUDA is not available; use 'cpu' or 'auto'.")
    if name != "cpu" and not name.startswith("cuda"):
        raise RegrowError(f"unknown device {name!r}; allowed values: auto, cpu, cuda, cuda:N.")
    return name


def search_path(recipe_path: str | os.PathLike[str] | None) -> list[Path]:
    return [Path(recipe_path).resolve().parent] if recipe_path else []
