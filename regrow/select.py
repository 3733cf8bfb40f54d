"""Which parameters are pruning targets.

A *target* is a parameter addressed by its fully-qualified name (fqn), e.g. ``features.0.weight``.

Default targets: the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layer (and Hugging Face ``Conv1D``,
GPT-2's Linear stored transposed) **except the final
classifier**, which is the last such layer in module registration order (``model.named_modules()``).
Pruning the classifier removes whole class scores and costs far more accuracy than it saves, so it is
left dense unless you name it in ``targets``.

``targets`` and ``ignore`` take fully-qualified names or shell-style globs (``fnmatch``: ``*`` also
crosses dots). An entry may name a parameter (``fc1.weight``) or a module (``fc1``, meaning its weight).
An entry that matches nothing is an error, so typos never pass silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from regrow.errors import RegrowError

PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_transposed_linear(module: nn.Module) -> bool:
    """A Linear whose weight is stored (inputs, outputs): Hugging Face's ``Conv1D`` (GPT-2 and its kin)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, nn.Parameter)


def prunable_layers(model: nn.Module) -> list[str]:
    """Names of the Linear and Conv layers of ``model`` (Hugging Face ``Conv1D`` too), in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_LAYERS) or is_transposed_linear(m)]


def transposed_targets(model: nn.Module, targets: Iterable[str]) -> set[str]:
    """The targets stored (inputs, outputs): patterns see them transposed, so that dim 0 is the outputs and dim
    1 the inputs (n:m groups run along the inputs, ``row`` scope along the outputs)."""
    out = set()
    for f in targets:
        owner, _, leaf = f.rpartition(".")
        if leaf == "weight" and is_transposed_linear(model.get_submodule(owner) if owner else model):
            out.add(f)
    return out


def final_classifier(model: nn.Module) -> str | None:
    """The layer excluded from the default targets: the last Linear/Conv layer registered."""
    layers = prunable_layers(model)
    return layers[-1] if layers else None


def default_targets(model: nn.Module) -> list[str]:
    """Weights of all Linear/Conv layers but the final classifier."""
    return [f"{name}.weight" if name else "weight" for name in prunable_layers(model)[:-1]]


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def _matches(entry: str, fqns: Sequence[str], modules: set[str]) -> list[str]:
    """Parameters named by ``entry``: a parameter fqn/glob, or a module name/glob meaning its weight."""
    hits = [f for f in fqns if fnmatchcase(f, entry)]
    if hits:
        return hits
    module_hits = {m for m in modules if fnmatchcase(m, entry)}
    return [f for f in fqns if f.endswith(".weight") and f[: -len(".weight")] in module_hits]


def _suggest(fqns: Sequence[str]) -> str:
    shown = ", ".join(fqns[:8])
    more = f" (and {len(fqns) - 8} more)" if len(fqns) > 8 else ""
    return f"the model's parameters are: {shown}{more}"


def resolve_targets(
    model: nn.Module,
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
) -> list[str]:
    """Return the target fqns, in the model's parameter order.

    Raises:
        RegrowError: an entry of ``targets`` or ``ignore`` matches no parameter, or nothing is left.
    """
    params = dict(model.named_parameters())
    fqns = list(params)
    # every name a parameter goes by (a tied weight has several) -> the name it is reported under
    canonical: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(param), name)
    names = list(canonical)
    modules = {name for name, _ in model.named_modules(remove_duplicate=False)}
    target_list, ignore_list = _as_list(targets), _as_list(ignore)

    def matches(entry: str) -> list[str]:
        return list(dict.fromkeys(canonical[h] for h in _matches(entry, names, modules)))

    if target_list is None:
        chosen = set(default_targets(model))
    else:
        chosen = set()
        for entry in target_list:
            hits = matches(entry)
            if not hits:
                raise RegrowError(
                    f"targets entry {entry!r} matches no parameter of the model; give a parameter or "
                    f"module name, or a glob such as 'layer1.*'; {_suggest(fqns)}."
                )
            chosen.update(hits)
    for entry in ignore_list or []:
        hits = matches(entry)
        if not hits:
            raise RegrowError(f"ignore entry {entry!r} matches no parameter of the model; {_suggest(fqns)}.")
        chosen.difference_update(hits)

    resolved = [f for f in fqns if f in chosen]
    non_float = [f for f in resolved if not params[f].is_floating_point()]
    if non_float:
        raise RegrowError(f"targets must be floating-point parameters; these are not: {non_float}.")
    if not resolved:
        if target_list is not None and not target_list:
            why = "'targets' is an empty list"
        elif ignore_list:
            why = "'ignore' removed every " + ("default target" if target_list is None else "matched parameter")
        else:
            why = "the model has no Linear or Conv layer besides its final classifier"
        raise RegrowError(f"no pruning targets: {why}; name the parameters to prune with 'targets'.")
    return resolved
