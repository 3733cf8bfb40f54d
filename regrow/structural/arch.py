"""Pickle-free save and load of shrunk models: ``model.safetensors`` + ``arch.json``.

``arch.json`` describes every module of the model: its class, its public scalar attributes
(``in_channels``, ``normalized_shape``, ``num_heads``, ...) and the shape and dtype of each parameter and
buffer. :func:`load` builds a fresh instance of the original architecture with ``factory()``, swaps in
regrow's attention and its stand-ins for torchvision's Swin, MaxViT and ShuffleNetV2 modules and timm's
attention modules that merge heads with their input's width where the saved
model had them, gives every module the recorded attributes and tensor shapes, then loads the weights from safetensors.
Nothing is unpickled at any point.

``arch.json`` is data, and :func:`load` checks it against a schema before anything is changed: at most
``MAX_BYTES`` and ``MAX_DEPTH`` levels of nesting; each module's class is the class of the factory's module
of that name (or regrow's attention in place of ``nn.MultiheadAttention``, its stand-in in place of a Swin,
MaxViT or ShuffleNetV2 module, a timm attention module or block, or a depthwise convolution with a channel
multiplier); attributes are public ones the factory's module already
holds as plain values (numbers, strings, booleans, ``None``, lists, tuples and sets of those), never ``_``-names,
``forward`` or ``training``, and, as ``config``, a layer's own head counts in front of the config the factory's module
holds (``{"__layer_config__": {"num_attention_heads": 2}}``, :mod:`regrow.structural.layer_config`: only head
counts the config holds, each from 1 to the config's); tensors have shapes of non-negative ints and a dtype from
``DTYPES``. Anything else is refused with a :class:`RegrowError` naming the entry.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regrow.errors import RegrowError
from regrow.export import load_weights, save_weights
from regrow.io import atomic_write_text
from regrow.structural.attention import MultiheadAttention, set_submodule
from regrow.structural.layer_config import KEY, LayerConfig, bind, encode, is_encoded, refusal
from regrow.structural.standins import STANDIN_CLASSES, standin_for

FORMAT = "regrow.arch"
VERSION = 1
_SCALARS = (bool, int, float, str, type(None))
MAX_BYTES = 64 * 2**20  # a BERT-base arch.json is ~0.1 MB
MAX_DEPTH = 64  # regrow.save writes 6 levels
MAX_DIMS = 16
DTYPES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "complex128",
    "complex64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
_ENTRY_KEYS = ("class", "attrs", "parameters", "buffers", "init")
_NEVER_SET = ("forward", "training")  # public names that are not a module's shape


def _jsonable(value: Any) -> Any:
    """JSON form of a scalar attribute (or of a layer's own view of a shared config), or a sentinel when it is not a
    plain value."""
    if isinstance(value, LayerConfig):
        return encode(value)
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
        return {"__tuple__": list(value)} if isinstance(value, tuple) else list(value)
    if isinstance(value, (set, frozenset)) and all(isinstance(v, (int, str)) for v in value):
        return {"__set__": sorted(value)}
    return _SKIP


_SKIP = object()


def _restore(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(value["__tuple__"])
    if isinstance(value, dict) and "__set__" in value:
        return set(value["__set__"])
    return value


def _class_name(module: nn.Module | type) -> str:
    cls = module if isinstance(module, type) else type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(model: nn.Module) -> dict[str, Any]:
    """The architecture of ``model`` as JSON-ready data."""
    modules = {}
    for name, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            encoded = _jsonable(value)
            if encoded is not _SKIP:
                attrs[key] = encoded
        entry: dict[str, Any] = {"class": _class_name(module), "attrs": attrs}
        params = {
            k: [list(p.shape), str(p.dtype).removeprefix("torch.")]
            for k, p in module._parameters.items()
            if p is not None
        }
        buffers = {
            k: [list(b.shape), str(b.dtype).removeprefix("torch.")] for k, b in module._buffers.items() if b is not None
        }
        if params:
            entry["parameters"] = params
        if buffers:
            entry["buffers"] = buffers
        if isinstance(module, MultiheadAttention):
            entry["init"] = module.init_args()
        modules[name] = entry
    return {"format": FORMAT, "version": VERSION, "modules": modules}


def tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of ``(module name, parameter name)`` that hold one shared Parameter (e.g. an embedding tied to
    the output layer)."""
    holders: dict[int, list[tuple[str, str]]] = {}
    seen_modules: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module_name, name))
    return [group for group in holders.values() if len(group) > 1]


def retie(model: nn.Module, groups: list[list[tuple[str, str]]]) -> None:
    """Make each group share one Parameter again, after surgery or loading replaced them one by one."""
    for (first_module, first_name), *others in groups:
        shared = model.get_submodule(first_module)._parameters[first_name]
        for module_name, name in others:
            module = model.get_submodule(module_name)
            current = module._parameters[name]
            if current is None or shared is None or current.shape != shared.shape:
                raise RegrowError(
                    f"{module_name}.{name} was tied to {first_module}.{first_name}, but their shapes now differ "
                    f"({None if current is None else tuple(current.shape)} and "
                    f"{None if shared is None else tuple(shared.shape)}); leave one of them out with ignore=[...]."
                )
            module._parameters[name] = shared


def apply(model: nn.Module, arch: dict[str, Any]) -> nn.Module:
    """Reshape a fresh ``model`` (same architecture, original sizes) to the one ``arch`` describes.

    ``arch`` is checked first (:func:`check_schema`, then against ``model``); a refused entry raises
    :class:`RegrowError` before anything is set."""
    check_schema(arch)
    entries = arch["modules"]
    ties = tied_parameters(model)  # the factory ties them; reshaping below replaces each on its own
    # 1. Swap in regrow's modules where the saved model had them.
    for name, entry in entries.items():
        _swap_in(model, name, entry["class"])
    present = dict(model.named_modules())
    missing = sorted(set(entries) - set(present))
    if missing:
        raise RegrowError(
            f"the factory's model lacks modules recorded in arch.json: {missing[:5]}; is it the same architecture?"
        )
    for name, entry in entries.items():
        _check_against(present[name], name, entry)
    # 2. Attributes and tensor shapes.
    for name, entry in entries.items():
        module = present[name]
        for key, value in entry["attrs"].items():
            if is_encoded(value):  # the layer's own head counts, in front of the factory's config
                own = value[KEY]
                bind(module, {k: (getattr(module.config, k), v) for k, v in own.items()})
            else:
                setattr(module, key, _restore(value))
        for key, (shape, dtype) in entry.get("parameters", {}).items():
            old = module._parameters[key]
            if list(old.shape) != shape or old.dtype != _dtype(dtype):  # shrunk, or saved in another precision
                module._parameters[key] = nn.Parameter(
                    torch.empty(shape, dtype=_dtype(dtype), device=old.device), requires_grad=old.requires_grad
                )
        for key, (shape, dtype) in entry.get("buffers", {}).items():
            old = module._buffers.get(key)
            if old is not None and (list(old.shape) != shape or old.dtype != _dtype(dtype)):
                if key in module._non_persistent_buffers_set:  # model.safetensors has no value for it
                    module._buffers[key] = _unsaved_buffer(old, shape, _dtype(dtype), name, key)
                else:
                    module._buffers[key] = torch.empty(shape, dtype=_dtype(dtype), device=old.device)
    retie(model, ties)
    return model


def _unsaved_buffer(old: Tensor, shape: list[int], dtype: torch.dtype, name: str, key: str) -> Tensor:
    """A non-persistent buffer of the recorded shape: the state dict leaves it out, so its value comes from the
    factory's. One that holds a single value throughout (timm's zero key bias beside q and v biases, which heads
    shrink) is that value at the new shape; one whose rows along its first dimension are all the same (timm's blur
    filter, one row a channel), and only that dimension shrank, is that row repeated; any other is refused rather
    than left as uninitialised memory. One that pruning cannot have changed, because its number of dimensions
    changed or it grew along one, is a value the model's forward pass computed and keeps (ConViT's relative
    positions, computed at the first call for its number of patches): the factory's stays, and its forward pass
    computes it again, where a zero one of the recorded shape would have been taken for the computed value."""
    old = old.detach()
    flat = old.reshape(-1)
    if list(old.shape) == shape or len(shape) != old.dim() or any(n > o for n, o in zip(shape, old.shape, strict=True)):
        return old.to(dtype)
    if flat.numel() and bool((flat == flat[0]).all()):
        return torch.full(shape, flat[0].item(), dtype=dtype, device=old.device)
    if old.dim() and old.shape[0] and list(old.shape[1:]) == shape[1:] and bool((old == old[:1]).all()):
        return old[:1].expand(shape).to(dtype).contiguous()
    raise RegrowError(
        f"cannot rebuild module {name!r}: its buffer {key!r} is not saved with the weights (non-persistent), "
        f"pruning changed its shape from {list(old.shape)} to {shape}, and the factory's holds more than one value "
        "(nor one row repeated), so the values that go with the new shape are unknown."
    )


def _refuse(name: str, problem: str) -> RegrowError:
    return RegrowError(
        f"arch.json: module {name!r}: {problem}; it was not written by regrow.save, so nothing was loaded."
    )


def check_schema(arch: Any) -> None:
    """Refuse an ``arch.json`` that is not what :func:`save` writes: its shape, nesting, values and dtypes."""
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise RegrowError("arch.json is not a regrow architecture file (its 'format' is not 'regrow.arch').")
    if arch.get("version") != VERSION:
        raise RegrowError(f"arch.json has version {arch.get('version')!r}; this regrow reads version {VERSION}.")
    extra = sorted(set(arch) - {"format", "version", "modules"})
    if extra or not isinstance(arch.get("modules"), dict):
        raise RegrowError(
            f"arch.json must hold exactly 'format', 'version' and 'modules' (an object of modules by name); "
            f"it has {sorted(arch)}."
        )
    _check_depth(arch)
    for name, entry in arch["modules"].items():
        _check_entry(name, entry)


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RegrowError(f"arch.json is nested more than {MAX_DEPTH} levels deep; regrow.save writes 6.")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _check_entry(name: str, entry: Any) -> None:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("class"), str)
        or not isinstance(entry.get("attrs"), dict)
    ):
        raise _refuse(name, "each module must be an object with a 'class' string and an 'attrs' object")
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise _refuse(name, f"unknown key(s) {unknown}; allowed keys: {', '.join(_ENTRY_KEYS)}")
    for key, value in entry["attrs"].items():
        if key.startswith("_") or key in _NEVER_SET:
            raise _refuse(
                name,
                f"attribute {key!r} may not be set (names starting with '_', {', '.join(_NEVER_SET)} are never set)",
            )
        if not _plain(value):
            raise _refuse(
                name,
                f"attribute {key!r} is {json.dumps(value)[:80]}; allowed values: numbers, strings, booleans, null, "
                "lists of those, {'__tuple__': [...]}, {'__set__': [...]} and, for 'config', "
                "{'__layer_config__': {name: integer}}",
            )
    init = entry.get("init", {})
    if not isinstance(init, dict) or not all(_plain(v) for v in init.values()):
        raise _refuse(name, "'init' must be an object of plain values")
    for kind in ("parameters", "buffers"):
        tensors = entry.get(kind, {})
        if not isinstance(tensors, dict):
            raise _refuse(name, f"{kind!r} must be an object of [shape, dtype] by name")
        for key, spec in tensors.items():
            _check_tensor(name, f"{kind[:-1]} {key!r}", spec)


def _plain(value: Any) -> bool:
    """The values :func:`describe` writes for an attribute."""
    if is_encoded(value):
        return True
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, list):
        return all(isinstance(v, _SCALARS) for v in value)
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        ((key, items),) = value.items()
        if key == "__tuple__":
            return all(isinstance(v, _SCALARS) for v in items)
        return key == "__set__" and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in items)
    return False


def _check_tensor(name: str, what: str, spec: Any) -> None:
    ok = isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], list) and len(spec[0]) <= MAX_DIMS
    ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in spec[0])
    if not ok:
        raise _refuse(name, f"{what} must be [shape, dtype] with a shape of at most {MAX_DIMS} non-negative ints")
    if spec[1] not in DTYPES:
        raise _refuse(name, f"{what} has dtype {str(spec[1])[:40]!r}; allowed dtypes: {', '.join(DTYPES)}")


def _check_against(module: nn.Module, name: str, entry: dict[str, Any]) -> None:
    """``entry`` only reshapes ``module``: same class, attributes it already holds as plain values, parameters
    it has."""
    if _class_name(module) != entry["class"]:
        raise _refuse(
            name,
            f"its class is {entry['class']!r}, but the factory's model has {_class_name(module)} there "
            "(allowed: the class of the factory's module, regrow's MultiheadAttention for torch's, or regrow's "
            "stand-in for a torchvision Swin, MaxViT or ShuffleNetV2 module, a timm attention or block, or a depthwise "
            "convolution with a channel multiplier)",
        )
    settable = sorted(
        k
        for k, v in vars(module).items()
        if not k.startswith("_") and k not in _NEVER_SET and _jsonable(v) is not _SKIP and _not_on_class(module, k)
    )
    for key, value in entry["attrs"].items():
        if is_encoded(value):
            config = vars(module).get(key) if key == "config" else None
            held = f"the factory's {type(module).__name__} holds no 'config' to stand in front of"
            why = held if config is None else refusal(config, value[KEY])
            if why is not None:
                raise _refuse(name, f"attribute {key!r} records a layer's own head counts, but {why}")
            continue
        if key not in settable:
            raise _refuse(
                name,
                f"attribute {key!r} is not a plain attribute of the factory's {type(module).__name__}; "
                f"allowed: {', '.join(settable) or 'none'}",
            )
    for key in entry.get("parameters", {}):
        if module._parameters.get(key) is None:
            raise RegrowError(f"parameter {name}.{key} of arch.json does not exist in the factory's model.")


def _not_on_class(module: nn.Module, key: str) -> bool:
    """An instance attribute not backed by a property, method or other non-plain value on the class."""
    found = inspect.getattr_static(type(module), key, None)
    return found is None or _jsonable(found) is not _SKIP


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise RegrowError(f"arch.json records an unknown dtype {name!r}; it was not written by regrow.save.")
    return dtype


def _swap_in(model: nn.Module, name: str, recorded: str) -> None:
    """Put regrow's module at ``name`` when arch.json records one there (its attention for
    ``nn.MultiheadAttention``, a stand-in for a torchvision Swin, MaxViT or ShuffleNetV2 module or a timm attention
    module) and the factory
    built the original. The model itself is never swapped (pruning does not swap it either); a class mismatch there is
    refused later, by the schema check."""
    if not name:
        return
    if recorded == _class_name(MultiheadAttention):
        current = _get(model, name)
        if isinstance(current, nn.MultiheadAttention):
            set_submodule(model, name, MultiheadAttention.from_torch(current))
        elif not isinstance(current, MultiheadAttention):
            raise RegrowError(
                f"arch.json expects attention at {name!r} but the factory's model has {type(current).__name__}."
            )
    elif recorded in {_class_name(c) for c in STANDIN_CLASSES}:
        current = _get(model, name)
        standin = standin_for(current)
        if standin is not None and _class_name(standin) == recorded:
            set_submodule(model, name, standin(current).train(current.training))
        elif _class_name(current) != recorded:
            raise RegrowError(
                f"arch.json expects regrow's {recorded.rsplit('.', 1)[-1]} at {name!r}, a stand-in for a torchvision "
                f"Swin, MaxViT or ShuffleNetV2 module, a timm attention or block, or a depthwise convolution with a "
                f"channel multiplier, but the factory's model has {type(current).__name__} there."
            )


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise RegrowError(f"the factory's model has no module {name!r} recorded in arch.json.") from None


def save(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``arch.json`` into ``directory`` (atomically; no pickle).

    Existing files of those names are replaced only with ``overwrite=True``.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise RegrowError(f"{str(out)!r} exists and is not a directory.")
    targets = [out / "model.safetensors", out / "arch.json"]
    clash = [p.name for p in targets if p.exists()]
    if clash and not overwrite:
        raise RegrowError(f"{str(out)!r} already holds {', '.join(clash)}; pass overwrite=True to replace them.")
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors", metadata=metadata)
    atomic_write_text(out / "arch.json", json.dumps(describe(model), indent=1) + "\n")
    return out


def _read(path: Path) -> Any:
    """arch.json as JSON data, refused when too big or too deeply nested to be regrow's."""
    folder = str(path.parent)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise RegrowError(
                f"arch.json in {folder!r} is larger than {MAX_BYTES // 2**20} MiB; regrow.save writes far less."
            )
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise RegrowError(
            f"arch.json in {folder!r} is nested more than {MAX_DEPTH} levels deep; regrow.save writes 6."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an int of 5000 digits
        raise RegrowError(f"arch.json in {folder!r} is not readable JSON ({exc}).") from None


def load(directory: str | os.PathLike[str], factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a saved model: ``factory()`` makes the original architecture, arch.json reshapes it.

    The model is returned in eval mode (call ``.train()`` to fine-tune it further).

    Raises:
        RegrowError: missing or unreadable files, an arch.json outside the schema (see the module docs), or a
        factory model that does not match arch.json.
    """
    folder = Path(directory)
    arch_path, weights = folder / "arch.json", folder / "model.safetensors"
    if not arch_path.is_file():
        raise RegrowError(f"{str(folder)!r} has no arch.json; save the model with regrow.save(model, directory).")
    arch = _read(arch_path)
    check_schema(arch)  # before the factory runs: a refused file changes nothing
    model = factory()
    if not isinstance(model, nn.Module):
        raise RegrowError(f"the factory returned {type(model).__name__}; it must return a torch.nn.Module.")
    try:
        apply(model, arch)
    except RegrowError:
        raise
    except (AttributeError, TypeError, KeyError, ValueError, RuntimeError) as exc:  # a hand-edited or foreign file
        raise RegrowError(
            f"arch.json in {str(folder)!r} does not describe modules as regrow.save writes them "
            f"({type(exc).__name__}: {exc})."
        ) from None
    load_weights(model, weights)
    return model.eval()
