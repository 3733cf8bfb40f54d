"""A layer's own view of a configuration its model shares among all its layers.

Some attention modules read their head count from the model's config in their forward pass, not from an attribute
of their own: Hugging Face's Phi-3 (every Phi-3 and Phi-4 checkpoint) splits its fused ``qkv_proj`` at
``self.config.num_attention_heads * self.head_dim``. One config serves every layer, so once heads leave one layer
its forward would split at the old width. :func:`bind` gives such a module a :class:`LayerConfig` instead: its own
head counts, and for every other name the shared config as it is at that moment (an attention implementation set
on the model later still reaches the layer). ``arch.json`` records the layer's values, and
:func:`regrow.structural.arch.apply` binds them again on load.
"""

from __future__ import annotations

from typing import Any

from regrow.structural.graph import HEAD_ATTRS, KV_ATTRS

KEY = "__layer_config__"  # how arch.json marks a LayerConfig among a module's attributes
NAMES = (*HEAD_ATTRS, *KV_ATTRS)  # the values a layer may hold as its own: head and key/value head counts


class LayerConfig:
    """``shared`` as one layer sees it: ``values`` (its own head counts) in front, everything else read through
    (and written through) to ``shared``. Only attribute reads see the layer's values: the shared config's own
    methods (``to_dict``, ``to_json_string``) describe the shared config, and the view is no instance of its class
    (no code that transformers runs on an attention's config asks either)."""

    def __init__(self, shared: Any, values: dict[str, int]) -> None:
        self.__dict__["shared"] = shared
        self.__dict__["values"] = dict(values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "shared" not in self.__dict__:  # copy and pickle look on a bare instance
            raise AttributeError(name)
        values = self.__dict__.get("values", {})
        return values[name] if name in values else getattr(self.__dict__["shared"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.values:
            self.values[name] = value
        else:
            setattr(self.shared, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self.shared).__name__}, {self.values})"


def bind(module: Any, changes: dict[str, tuple[int, int]]) -> None:
    """Where the config ``module`` holds gives the old value of a name in ``changes`` (name: (old, new)), make the
    module see the new one, in a :class:`LayerConfig` in front of the shared config; nothing else changes."""
    config = getattr(module, "config", None)
    if config is None:
        return
    shared = config.shared if isinstance(config, LayerConfig) else config
    own = dict(config.values) if isinstance(config, LayerConfig) else {}
    for key, (old, new) in changes.items():
        seen = getattr(config, key, None)
        if type(seen) is int and seen == old:
            own[key] = new
    own = {k: v for k, v in own.items() if getattr(shared, k, None) != v}
    if own:
        module.config = LayerConfig(shared, own)
    elif isinstance(config, LayerConfig):
        module.config = shared


def encode(value: Any) -> dict[str, dict[str, int]] | None:
    """arch.json's form of a LayerConfig (None for anything else)."""
    return {KEY: dict(value.values)} if isinstance(value, LayerConfig) else None


def is_encoded(value: Any) -> bool:
    """Whether ``value`` has arch.json's form of a LayerConfig: its own values, names to integers."""
    if not (isinstance(value, dict) and len(value) == 1 and isinstance(value.get(KEY), dict)):
        return False
    return all(isinstance(k, str) and type(v) is int for k, v in value[KEY].items())


def refusal(config: Any, own: dict[str, Any]) -> str | None:
    """Why a layer's recorded ``own`` values may not stand in front of the factory's ``config`` (None when they
    may): only head counts (``NAMES``) the config holds as integers, each at least 1 and at most the config's
    (a layer only loses heads)."""
    for name, value in own.items():
        held = getattr(config, name, None) if config is not None else None
        if name not in NAMES or type(held) is not int:
            return f"{name!r} is no head count the factory's config holds (allowed: {', '.join(NAMES)})"
        if not 1 <= value <= held:
            return f"{name} = {value}, outside 1..{held} (a layer only loses heads)"
    return None
