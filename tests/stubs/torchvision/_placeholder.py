"""Names that exist only so that timm's modules import; using one raises a clear error."""

from __future__ import annotations

from typing import Any


def missing(module: str, name: str) -> AttributeError:
    return AttributeError(
        f"{module}.{name} is not part of regrow's test stand-in for torchvision (tests/stubs); install the real "
        "torchvision to use timm's data pipeline."
    )


def placeholder_class(module: str, name: str) -> type:
    """A class that may be subclassed (timm does) but not instantiated."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(str(missing(module, name)))

    return type(name, (), {"__init__": __init__, "__module__": module})
