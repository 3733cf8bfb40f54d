"""The typed run configuration: one source of truth for recipes, the CLI and the saved ``config.yaml``.

A recipe is a YAML file that mirrors :class:`RunConfig`. Unknown keys and bad values are rejected with
one paragraph that names the key and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from regrow.config.checks import check_config
from regrow.config.schema import (
    BUDGET_KEYS,
    AccelerateConfig,
    CheckpointConfig,
    ComponentConfig,
    DataConfig,
    DynamicConfig,
    EvaluateConfig,
    ModelConfig,
    OriginalConfig,
    PruneConfig,
    RecoverConfig,
    RunConfig,
    ScheduleConfig,
    SensitivityConfig,
    ShareConfig,
    StopConfig,
    TrainConfig,
)
from regrow.errors import RegrowError

__all__ = [
    "BUDGET_KEYS",
    "AccelerateConfig",
    "CheckpointConfig",
    "ComponentConfig",
    "DataConfig",
    "DynamicConfig",
    "EvaluateConfig",
    "ModelConfig",
    "OriginalConfig",
    "PruneConfig",
    "RecoverConfig",
    "RunConfig",
    "ScheduleConfig",
    "SensitivityConfig",
    "ShareConfig",
    "StopConfig",
    "TrainConfig",
    "apply_overrides",
    "builtin_recipes",
    "explain",
    "load_config",
    "read_recipe",
    "settle_strategy",
    "validate",
    "yaml_load",
]


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 safe loading without base-60 numbers, so ``pattern: 2:4`` stays the string "2:4"."""


RecipeLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"),
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by the base constructor below
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, not {type(key).__name__}", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1}); a later one would silently replace it",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------------
# Errors: pydantic's report -> one paragraph


def _fields_at(loc: tuple[Any, ...]) -> list[str] | None:
    """Allowed keys of the config section at ``loc`` (the parent of the offending key)."""
    model: Any = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return list(model.model_fields)


def explain(exc: ValidationError, source: str = "config") -> RegrowError:
    parts = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            parts.append(f"unknown key '{where}'{hint}")
        elif err["type"] == "missing":
            parts.append(f"missing key '{where}'")
        else:
            msg = err["msg"].removeprefix("Value error, ").rstrip(".")
            given = err.get("input")
            shown = f" (got {given!r})" if given is not None and not isinstance(given, (dict, list)) else ""
            parts.append(f"'{where}': {msg}{shown}" if loc else msg)
    return RegrowError(f"invalid {source}: " + "; ".join(parts).rstrip(".") + ".")


def validate(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    if not isinstance(data, Mapping):
        raise RegrowError(f"invalid {source}: the top level must be a mapping of keys (model, data, prune, ...).")
    try:
        cfg = RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise explain(exc, source) from None
    check_config(cfg)  # the settings refused together (regrow.checks), before anything is loaded
    return cfg


# --------------------------------------------------------------------------------------------------
# Recipes and overrides


def builtin_recipes() -> dict[str, Path]:
    folder = Path(__file__).parents[1] / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def read_recipe(recipe: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """Parse a recipe file (or a built-in recipe name) into a plain dict."""
    path = Path(recipe)
    if not path.exists() or path.is_dir():  # a folder that shares a built-in recipe's name does not hide it
        builtins = builtin_recipes()
        if str(recipe) in builtins:
            path = builtins[str(recipe)]
        elif path.is_dir():
            raise RegrowError(f"recipe {os.fspath(recipe)!r} is a directory, not a recipe file.")
        else:
            raise RegrowError(
                f"recipe {os.fspath(recipe)!r} is neither a file nor a built-in recipe; built-in recipes: "
                f"{', '.join(builtins) or 'none'}."
            )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegrowError(f"cannot read recipe {str(path)!r}: {exc}.") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RegrowError(f"recipe {str(path)!r} is not valid YAML{where}: {problem}.") from None
    if data is None:
        raise RegrowError(f"recipe {str(path)!r} is empty.")
    if not isinstance(data, dict):
        raise RegrowError(
            f"recipe {str(path)!r} must be a mapping of keys (model, data, prune, ...), not a {type(data).__name__}."
        )
    return data, path


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``0.9``, ``null``, ``[a, b]``)."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RegrowError(f"--set {item!r} must look like key=value, e.g. prune.sparsity=0.8.")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.constructor.ConstructorError as exc:  # valid YAML that would lose a value: a duplicate key
            raise RegrowError(f"--set {item!r}: {exc.problem}.") from None
        except yaml.YAMLError:
            value = raw  # not YAML: the text itself (e.g. a path with a colon)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def settle_strategy(data: dict[str, Any]) -> dict[str, Any]:
    """Decide auto vs manual on the recipe as written, before ``--set`` overrides: setting e.g.
    ``recover.epochs`` on the command line keeps an only-a-budget recipe on strategy auto."""
    if data.get("strategy") is not None or not isinstance(data.get("prune"), Mapping):
        return data
    only_budget = set(data["prune"]) <= set(BUDGET_KEYS)
    return dict(data, strategy="auto") if only_budget and not ({"schedule", "recover"} & set(data)) else data


def load_config(recipe: str | os.PathLike[str], overrides: list[str] | None = None) -> tuple[RunConfig, Path]:
    """A recipe file or built-in recipe name, with ``"key.sub=value"`` overrides applied, as a validated
    :class:`RunConfig`, and the path it was read from. Bad keys or values raise :class:`RegrowError`."""
    data, path = read_recipe(recipe)
    data = apply_overrides(settle_strategy(data), overrides or [])
    return validate(data, source=f"recipe {str(path)!r}"), path
