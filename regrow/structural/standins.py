"""regrow's stand-ins for library modules that channel pruning cannot follow as they are written.

Each stand-in computes its original's function with the same operations (outputs equal to the bit in the tests;
PiT's, below, and iFormer's against timm's fused kernel, equal but for rounding) and keeps every parameter and
buffer name, so state dicts load either way: torchvision's Swin and MaxViT attention and Swin's patch merging
(:mod:`regrow.structural.windows`), torchvision's ShuffleNetV2 block (:mod:`regrow.structural.shuffle`), timm's
attention modules that merge their heads with their input's width (:mod:`regrow.structural.timm_attention`), timm's
attention over feature maps that splits or slices by widths it stores (:mod:`regrow.structural.map_attention`), and
PiT's pooling (:mod:`regrow.structural.multiplier`, a repeat then a depthwise convolution in place of a grouped
one), and MobileViT's block (:mod:`regrow.structural.patches`, its unfolding into patches with the channels kept
apart).
:func:`convert_standins` swaps them in before tracing; ``arch.json`` records the swap, and
:func:`regrow.structural.arch.apply` makes it again on load. The originals are recognised by their module and
class name; neither library is imported.

Libraries change their modules between versions, and a stand-in copies one version's forward. Given the example
batch, :func:`convert_standins` therefore runs the model once, gives each stand-in what its original received,
and swaps it in only where it returns the original's output; elsewhere the original stays and a warning says why.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from regrow.batches import forward, tensors
from regrow.structural.attention import set_submodule
from regrow.structural.map_attention import STANDINS as MAP_ATTENTION
from regrow.structural.multiplier import STANDINS as MULTIPLIER
from regrow.structural.multiplier import MultipliedConv2d, is_multiplier
from regrow.structural.patches import STANDINS as PATCHES
from regrow.structural.shuffle import STANDINS as SHUFFLE
from regrow.structural.timm_attention import STANDINS as TIMM
from regrow.structural.windows import STANDINS as WINDOWS

STANDINS: dict[str, type[nn.Module]] = {**WINDOWS, **SHUFFLE, **TIMM, **MAP_ATTENTION, **MULTIPLIER, **PATCHES}
STANDIN_CLASSES: tuple[type[nn.Module], ...] = (*STANDINS.values(), MultipliedConv2d)  # what load may swap in


def standin_for(module: nn.Module) -> type[nn.Module] | None:
    """regrow's stand-in class for ``module``'s class (None when it needs none); a depthwise convolution with a
    channel multiplier gets one whatever holds it (:class:`regrow.structural.multiplier.MultipliedConv2d`)."""
    cls = type(module)
    return STANDINS.get(f"{cls.__module__}.{cls.__qualname__}") or (MultipliedConv2d if is_multiplier(module) else None)


def convert_standins(model: nn.Module, inputs: Any = None) -> list[str]:
    """Swap regrow's stand-ins in for the modules of ``model`` that have one, in place; returns their names. A
    model that is itself such a module is left as it is (it has no parent to hold its stand-in).

    With ``inputs`` (the model's example batch), each stand-in is first compared with its original on what the
    original received in one forward pass (in eval mode; the modes are restored); one whose output differs, or
    that the pass does not reach, is not swapped in, and a warning names it; where the batch does not run at all,
    nothing is. Without, every module that has a stand-in is swapped (as on load, where ``arch.json`` records the
    swaps that were compared before)."""
    found = [(name, module) for name, module in model.named_modules() if name and standin_for(module) is not None]
    # a module inside one that has a stand-in is the stand-in's to compute (PiT's pooling holds a convolution
    # with a channel multiplier, which its stand-in already computes as a repeat and a depthwise convolution)
    found = [(name, m) for name, m in found if not any(name.startswith(f"{outer}.") for outer, _ in found)]
    if not found:
        return []
    kept = _compare(model, found, inputs) if inputs is not None else {}
    if kept is None:
        return []
    converted = []
    for name, module in found:
        if name in kept:
            warnings.warn(
                f"{name}: kept {type(module).__module__}.{type(module).__qualname__} as it is, because regrow's "
                f"stand-in for it {kept[name]}; channel pruning may have to leave out the widths it reads.",
                stacklevel=2,
            )
            continue
        set_submodule(model, name, standin_for(module)(module).train(module.training))
        converted.append(name)
    return converted


def _compare(model: nn.Module, found: list[tuple[str, nn.Module]], inputs: Any) -> dict[str, str] | None:
    """Why each stand-in that does not give its original's output on the example batch differs, by name (None
    when the example batch does not run: the checks that follow report that, and nothing is swapped). The
    pass runs in eval mode (no dropout, no running statistics updated), each stand-in on its original's first call
    as it returns (nothing kept past it), and the modes are restored after."""
    differ: dict[str, str] = {}

    def comparer(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if name in differ:
                return  # compared on its first call
            try:
                why = _difference(standin_for(module)(module).eval()(*args, **kwargs), output)
            except Exception as error:  # a version of the library whose module the stand-in does not know
                why = f"{type(error).__name__}: {error}"
            differ[name] = "" if why is None else f"does not compute what it computes ({why})"

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(comparer(name), with_kwargs=True) for name, module in found]
    try:
        with torch.no_grad():
            forward(model.eval(), inputs)
    except Exception:  # the checks that follow report a model that cannot run its example batch
        return None
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    for name, _ in found:
        differ.setdefault(name, "could not be compared with it: the example batch does not reach it")
    return {name: why for name, why in differ.items() if why}


def _difference(got: Any, expected: Any) -> str | None:
    """None when ``got`` holds ``expected``'s tensors, equal but for rounding; otherwise how they differ."""
    got_t, expected_t = list(tensors(got)), list(tensors(expected))
    if [t.shape for t in got_t] != [t.shape for t in expected_t]:
        return f"outputs of shapes {[tuple(t.shape) for t in got_t]}, not {[tuple(t.shape) for t in expected_t]}"
    for a, b in zip(got_t, expected_t):
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return "different integer outputs"
            continue
        scale = float(b.detach().abs().max()) if b.numel() else 0.0
        tolerance = max(1e-5, 8 * torch.finfo(b.dtype).eps) * scale  # the same operations: equal but for rounding
        gap = float((a.detach().float() - b.detach().float()).abs().max()) if b.numel() else 0.0
        if not gap <= tolerance:  # a NaN gap differs too
            return f"largest difference {gap:.3g}, tolerance {tolerance:.3g}"
    return None
