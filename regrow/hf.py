"""Hugging Face out: a masked model saved as an ordinary ``save_pretrained`` folder, plus a small sidecar.

:func:`save_pretrained` writes what ``transformers`` writes (``config.json``, dense ``model.safetensors`` whose
pruned weights are exact zeros; the tokenizer's files when one is given), so ``from_pretrained`` loads it with
no regrow installed. Beside them, ``regrow_masks.safetensors`` holds the masks bit-packed (one bit per weight,
eight times smaller than booleans) and ``regrow.json`` the pruning request, the sparsity and, when given, the
run's report. :func:`load_masks` reads the masks back, e.g. to keep them during further fine-tuning.

A shrunk model (channels or heads removed) is saved the same way when its Hugging Face config can express the
new widths: the config is updated (head counts, key/value heads and ``head_dim`` where the config has them, the
FFN width ``intermediate_size`` / ``n_inner`` / ``ffn_dim`` / ``d_ff``, the hidden size ``hidden_size`` /
``n_embd`` / ``d_model`` / ``dim`` / ``word_embed_proj_dim``) and checked twice: the model class built from it on
the meta device must give every tensor the shrunk model's shape, and built around the model's own weights it must
compute the model's outputs on its dummy inputs (a class may derive more than widths from its config: Gemma scales
its embeddings by the square root of ``hidden_size``). That needs the same widths in every layer — prune with
``scope="layer"`` to keep them uniform — and a config that states them (Llama-style configs give ``head_dim``; BERT
and GPT-2 derive the head size from the hidden size, so their heads cannot be removed in a ``from_pretrained``
model, only their FFN channels). Anything else is refused with the reason; save it with :func:`regrow.save`, which
records the new architecture.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from regrow.batches import forward
from regrow.errors import RegrowError, first_line
from regrow.masks import MaskSet, pack, unpacked
from regrow.spec import PruneSpec
from regrow.staging import fsync_dir, signals_deferred, sync_tree, token, umask

SIDECAR = "regrow.json"
ASIDE = "-old-"  # .NAME-old-*: the folder an overwrite replaces, until the new one is in place
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
    is refused unless ``overwrite`` (then replaced as a whole: moved aside, and deleted once the new one is in
    place), and a file or a link of that name always. A model with NaN or infinite weights is refused.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise RegrowError(
            f"regrow.hf.save_pretrained needs a Hugging Face model (one with .save_pretrained); got "
            f"{type(model).__name__}. Save other models with regrow.save."
        )
    config = shrunk_config(model) if masks.structure is not None or _shrunk(model) else None
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise RegrowError(f"the model holds NaN or infinite weights (in {', '.join(bad[:3])}); nothing was written.")
    target = Path(folder)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        kind = "a link" if target.is_symlink() else "a file"
        raise RegrowError(
            f"{os.fspath(target)!r} is {kind}, not a folder; regrow.hf.save_pretrained writes a folder and never "
            "replaces a file or a link, even with overwrite=True. Choose another folder."
        )
    _interrupted_before(target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise RegrowError(
            f"{os.fspath(target)!r} exists and is not empty; choose another folder or pass overwrite=True."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        original, model.config = model.config, config if config is not None else model.config
        try:
            model.save_pretrained(staging, safe_serialization=True)
        finally:
            model.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _save_packed(masks, staging / MASKS)
        sidecar = {
            "format": "regrow.hf",
            "version": 1,
            "masks": MASKS,
            "spec": masks.spec.to_dict() if masks.spec is not None else None,
            "sparsity": masks.sparsity(),
            "structure": masks.structure.to_dict() if masks.structure is not None else None,
            "report": report.to_dict() if hasattr(report, "to_dict") else report,
        }
        (staging / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str), encoding="utf-8")
        _usual_permissions(staging)
        sync_tree(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and safetensors its files 0600: give them what the umask gives."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder onto ``target``. An earlier folder there is moved aside first and
    deleted only once the new one is in place; Ctrl-C and SIGTERM wait until the renames are done. A kill in
    between leaves it beside, as ``.NAME-old-*``, which the next save names (:func:`_interrupted_before`)."""
    with signals_deferred():
        if not target.exists():
            staging.replace(target)
            fsync_dir(target.parent)
            return
        aside = target.with_name(f".{target.name}{ASIDE}{token()}")
        target.replace(aside)
        try:
            staging.replace(target)
        except BaseException as exc:
            try:
                aside.replace(target)
            except OSError:
                raise RegrowError(
                    f"the new folder could not be renamed to {os.fspath(target)!r} ({exc}), and the earlier one could "
                    f"not be put back: it is at {os.fspath(aside)!r}."
                ) from exc
            raise
        fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _interrupted_before(target: Path) -> None:
    """Refuse to go on when an earlier save into ``target`` was killed after moving the old folder aside."""
    if target.exists():
        return
    prefix = f".{target.name}{ASIDE}"
    aside = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix)) if target.parent.is_dir() else []
    if aside:
        raise RegrowError(
            f"an earlier save into {os.fspath(target)!r} was interrupted after moving the folder that was there to "
            f"{os.fspath(aside[0])!r}; rename it back, or delete it, then save again."
        )


FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "word_embed_proj_dim")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _built(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of the model class built from ``config`` (on the meta device: no memory, no init); a
    RegrowError when the class or the config refuses the widths (e.g. a hidden size no multiple of the heads)."""
    try:
        if callable(getattr(config, "validate", None)):
            config.validate()  # transformers' own checks, which save_pretrained and from_pretrained apply
        with torch.device("meta"):
            return _shapes(type(model)(config))
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds; one message names the reason
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise RegrowError(
            f"the Hugging Face config of {type(model).__name__} cannot state this shrunk model's widths "
            f"({type(exc).__name__}: {first}). Save it with regrow.save, which records the new architecture."
        ) from None


def _shrunk(model: nn.Module) -> bool:
    """Whether the model's tensors differ in shape from those its config builds (shrunk without the masks saying
    so: by hand, or the masks of another step)."""
    try:
        built = _built(model, model.config)
    except RegrowError:  # a class that does not build from its config alone: nothing to compare with
        return False
    # only tensors both have: constructor options outside the config add some (ViT's mask token) or drop some
    return any(built.get(name, shape) != shape for name, shape in _shapes(model).items())


def _uniform(values: set[int], what: str) -> int:
    if len(values) != 1:
        raise RegrowError(
            f"the layers of this shrunk model have different {what} ({sorted(values)}), which a Hugging Face config "
            "cannot state (one value for all layers). Prune with scope='layer' to keep the widths uniform, or save "
            "it with regrow.save, which records the new architecture."
        )
    return values.pop()


def shrunk_config(model: nn.Module) -> Any:
    """A copy of the model's Hugging Face config stating the shrunk widths; a RegrowError saying why when the
    config cannot state them (checked by building the model class from it)."""
    from regrow.structural.graph import HEAD_ATTRS, find_attention, head_count
    from regrow.structural.heads import head_group

    config = copy.deepcopy(model.config)
    attention = [head_group(n, m, model) for n, m in find_attention(model).items()]
    attention = [g for g in attention if g.excluded is None]
    if attention:
        heads = _uniform({g.heads for g in attention}, "numbers of attention heads")
        for key in HEAD_ATTRS:  # the configs' names for the head count are those of the attention modules
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, heads)
        if isinstance(getattr(config, "num_key_value_heads", None), int):
            config.num_key_value_heads = _uniform({g.kv_heads for g in attention}, "numbers of key/value heads")
        stated, hidden = getattr(config, "head_dim", None), getattr(config, "hidden_size", None)
        if isinstance(stated, int) or (
            stated is None and isinstance(hidden, int) and heads != head_count(model.config)
        ):
            # stated, also where the class would derive it as the hidden size over the heads (Phi-3) and heads went
            config.head_dim = _uniform({g.head_dim for g in attention}, "head sizes")
    before, now = _built(model, model.config), _shapes(model)
    projections = tuple(f"{m}." for g in attention for m in g.members)  # not the FFN, whatever their widths
    for key in FFN_KEYS:
        old = getattr(config, key, None)
        if key == "n_inner" and old is None and isinstance(getattr(config, "n_embd", None), int):
            old = 4 * config.n_embd  # GPT-2's default FFN width
        if not isinstance(old, int):
            continue
        widths = {
            new
            for name, shape in now.items()
            if name in before and before[name] != shape and not name.startswith(projections)
            for was, new in zip(before[name], shape, strict=False)
            if was == old and new != old
        }
        if widths:
            setattr(config, key, _uniform(widths, "FFN widths"))
    _hidden_size(model, config, before)
    expected = _built(model, config)
    wrong = [n for n, shape in now.items() if expected.get(n) != shape]
    if wrong:
        n = wrong[0]
        raise RegrowError(
            f"the Hugging Face config of {type(model).__name__} cannot state this shrunk model's widths: {n} is "
            f"{now[n]}, and the config (widths updated) gives {expected.get(n)} ({len(wrong)} tensors differ). "
            "Its heads' size may follow from the hidden size (BERT, GPT-2), so removed heads or a narrower hidden "
            "size cannot be stated. Save it with regrow.save, which records the new architecture."
        )
    _same_function(model, config)
    return config


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers meanwhile is moved to the meta device (no memory, no init); buffers
    are built as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _rebuilt(model: nn.Module, config: Any) -> nn.Module:
    """The model's class built from ``config`` around the model's own parameters and saved buffers (nothing is
    copied). The buffers a checkpoint does not hold are built from the config, as loading builds them; where one
    equals the model's own up to the model's precision (rotary frequencies, which a model cast to bfloat16 holds
    rounded), the model's own is taken, so that only what the config changes shows in the outputs."""
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    with _parameters_on_meta():
        rebuilt = type(model)(config)
    own = dict(model.named_buffers(remove_duplicate=False))
    for owner, module in rebuilt.named_modules():
        for attr, buffer in module._buffers.items():
            if buffer is None or attr not in module._non_persistent_buffers_set:
                continue
            theirs = own.get(f"{owner}.{attr}" if owner else attr)
            module._buffers[attr] = theirs if _same_values(theirs, buffer) else buffer.to(device)
    for name, tensor in model.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        rebuilt.get_submodule(owner)._parameters[attr] = tensor
    for module in rebuilt.modules():  # layers the config builds and the model lacks (a pooler): zeros, as if new
        for attr, param in module._parameters.items():
            if param is not None and param.is_meta:
                zeros = torch.zeros(param.shape, dtype=dtype if param.is_floating_point() else param.dtype)
                module._parameters[attr] = nn.Parameter(zeros.to(device), requires_grad=False)
    for name, tensor in model.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        module = rebuilt.get_submodule(owner)
        if attr not in module._non_persistent_buffers_set:
            module._buffers[attr] = tensor
    return rebuilt.eval()


def _same_values(ours: torch.Tensor | None, built: torch.Tensor) -> bool:
    """``built`` holds ``ours`` up to the rounding of the less precise of the two dtypes."""
    if ours is None or ours.shape != built.shape or ours.is_floating_point() != built.is_floating_point():
        return False
    if not ours.is_floating_point():
        return torch.equal(ours.cpu(), built.cpu())
    eps = max(torch.finfo(ours.dtype).eps, torch.finfo(built.dtype).eps)
    return torch.allclose(ours.detach().cpu().double(), built.detach().cpu().double(), rtol=4 * eps, atol=0.0)


def _same_function(model: nn.Module, config: Any) -> None:
    """Refuse a config that states the shrunk widths but not what the model computes: the class built from it
    (:func:`_rebuilt`) must give the model's outputs on its dummy inputs. Gemma scales its embeddings by the square
    root of ``hidden_size`` (a buffer built from the config), so a config stating a narrower hidden size would load
    as another function."""
    inputs = getattr(model, "dummy_inputs", None)
    if not isinstance(inputs, dict) or not inputs:
        return
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    was = model.training
    try:
        with torch.no_grad():
            ours = forward(model.eval(), inputs)
    except Exception:  # noqa: BLE001 - a model that does not run on its dummy inputs keeps the shape check only
        return
    finally:
        model.train(was)
    try:
        with torch.no_grad():
            theirs = forward(_rebuilt(model, config), inputs)
    except Exception as exc:  # noqa: BLE001 - whatever stops the rebuilt model from running, it cannot be saved so
        raise RegrowError(
            f"a {type(model).__name__} built from the updated Hugging Face config could not run with this model's "
            f"weights ({first_line(exc)}). Save it with regrow.save, which records the new architecture."
        ) from None
    if ours.shape != theirs.shape or not torch.equal(ours, theirs):
        diff = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
        raise RegrowError(
            f"the Hugging Face config of {type(model).__name__} states this shrunk model's widths, but the model "
            f"built from it computes other outputs (max difference {diff:.3g}): the class derives more than widths "
            "from the config (Gemma scales its embeddings by the square root of hidden_size). Save it with "
            "regrow.save, which records the new architecture."
        )


def _hidden_size(model: nn.Module, config: Any, before: dict[str, tuple[int, ...]]) -> None:
    """States a narrower residual stream (channel pruning of the hidden size): the input embedding's width, in each
    key that held its width before (``before``: the unshrunk model's tensor shapes; OPT's ``word_embed_proj_dim``
    too, where it equals the hidden size). Widths that the config derives from the hidden size are written out
    first: GPT-2's FFN (``4 * n_embd``) and the head size of a config that may state it but does not (Qwen2,
    Phi-3: ``hidden_size // num_attention_heads``)."""
    from regrow.structural.graph import head_count

    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    width = getattr(embeddings, "weight", None)
    name = next((n for n, p in model.named_parameters() if p is width), None)
    if width is None or width.dim() != 2 or name not in before or before[name][1] == width.shape[1]:
        return
    heads = head_count(model.config) or 0
    for key in HIDDEN_KEYS:
        old = getattr(config, key, None)
        if isinstance(old, int) and old == before[name][1]:
            if key == "n_embd" and getattr(config, "n_inner", 0) is None:
                config.n_inner = 4 * old
            if key == "hidden_size" and getattr(config, "head_dim", None) is None and heads and old % heads == 0:
                config.head_dim = old // heads
            setattr(config, key, int(width.shape[1]))


def _save_packed(masks: MaskSet, path: Path) -> None:
    tensors = {f: pack(m) for f, m in masks.items()}
    shapes = {f: list(m.shape) for f, m in masks.items()}
    save_file(tensors, str(path), metadata={"format": "regrow.packed-masks", "shapes": json.dumps(shapes)})


def load_masks(folder: str | os.PathLike[str]) -> MaskSet:
    """The masks :func:`save_pretrained` wrote into ``folder`` (with their pruning request)."""
    path = Path(folder) / MASKS
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = json.loads((fh.metadata() or {})["shapes"])
            masks = unpacked({f: fh.get_tensor(f) for f in shapes}, shapes)
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
