"""regrow's stand-ins for library modules that channel pruning cannot follow as they are written.

Each stand-in computes its original's function with the same operations (outputs equal to the bit in the
tests) and keeps every parameter and buffer name, so state dicts load either way: torchvision's Swin and MaxViT
attention and Swin's patch merging (:mod:`regrow.structural.windows`), torchvision's ShuffleNetV2 block
(:mod:`regrow.structural.shuffle`). :func:`convert_standins` swaps them in before tracing; ``arch.json`` records
the swap, and :func:`regrow.structural.arch.apply` makes it again on load. The originals are recognised by their
module and class name; torchvision is never imported.
"""

from __future__ import annotations

from torch import nn

from regrow.structural.attention import set_submodule
from regrow.structural.shuffle import STANDINS as SHUFFLE
from regrow.structural.windows import STANDINS as WINDOWS

STANDINS: dict[str, type[nn.Module]] = {**WINDOWS, **SHUFFLE}


def standin_for(module: nn.Module) -> type[nn.Module] | None:
    """regrow's stand-in class for ``module``'s class (None when it needs none)."""
    cls = type(module)
    return STANDINS.get(f"{cls.__module__}.{cls.__qualname__}")


def convert_standins(model: nn.Module) -> list[str]:
    """Swap regrow's stand-ins in for the modules of ``model`` that have one, in place; returns their names. A
    model that is itself such a module is left as it is (it has no parent to hold its stand-in)."""
    converted = []
    for name, module in list(model.named_modules()):
        standin = standin_for(module)
        if standin is not None and name:
            set_submodule(model, name, standin(module).train(module.training))
            converted.append(name)
    return converted
