"""Checking the options of a structural prune before any work: pattern, criterion, budget, scope, rounding."""

from __future__ import annotations

from torch import nn

from regrow.errors import RegrowError
from regrow.structural.importance import GROUP_CRITERIA

STRUCTURAL_PATTERNS = ("channel", "head", "channel+head")
MAX_SPARSITY = 0.9


def check_structural_budget(
    sparsity: float | None,
    macs: float | None,
    params: float | None,
    threshold: float | None,
    latency: float | None = None,
) -> tuple[str, float]:
    """The one budget given, as (kind, value); raises when there is none, more than one, or one out of range."""
    if threshold is not None:
        raise RegrowError("structural patterns take sparsity=, macs=, params= or latency=, not threshold=.")
    given = {
        k: v
        for k, v in (("sparsity", sparsity), ("macs", macs), ("params", params), ("latency", latency))
        if v is not None
    }
    if len(given) != 1:
        raise RegrowError(
            "give exactly one budget for a structural pattern: sparsity (fraction of channels or heads removed, "
            "in [0, 1)), macs (fraction of MACs to keep, in (0, 1]), params (fraction of parameters to keep, "
            f"in (0, 1]) or latency (fraction of the measured latency to keep, in (0, 1]); got "
            f"{', '.join(given) or 'none'}."
        )
    kind, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RegrowError(f"{kind} must be a number; got {value!r}.")
    if kind == "sparsity" and not 0.0 <= value < 1.0:
        raise RegrowError(
            f"sparsity must be a number in [0, 1) (the fraction of channels or heads removed); got {value!r}."
        )
    what = {"macs": "MACs", "params": "parameters", "latency": "measured latency"}.get(kind, kind)
    if kind != "sparsity" and not 0.0 < value <= 1.0:
        raise RegrowError(f"{kind} must be in (0, 1]: the fraction of the model's {what} to keep; got {value!r}.")
    return kind, float(value)


def _check_options(pattern: str, criterion: str, round_to: int | None) -> None:
    """Raise on an unknown pattern or criterion, or a ``round_to`` that is not a positive integer."""
    if pattern not in STRUCTURAL_PATTERNS:
        raise RegrowError(f"unknown structural pattern {pattern!r}; allowed values: {', '.join(STRUCTURAL_PATTERNS)}.")
    if criterion not in GROUP_CRITERIA:
        raise RegrowError(
            f"unknown criterion {criterion!r} for pattern {pattern!r}; allowed values: {', '.join(GROUP_CRITERIA)}."
        )
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise RegrowError(f"round_to must be a positive integer (e.g. 8); got {round_to!r}.")


def has_channels(pattern: str) -> bool:
    """Whether the pattern removes channels (and so follows the channel rounding)."""
    return pattern in ("channel", "channel+head")


def has_heads(pattern: str) -> bool:
    return pattern in ("head", "channel+head")


def check_within(model: nn.Module, within: str | None) -> None:
    """``within`` must name a submodule (not the model itself)."""
    if within is None:
        return
    names = [n for n, _ in model.named_modules() if n]
    if not isinstance(within, str) or within not in names:
        children = ", ".join(n for n, _ in model.named_children())
        raise RegrowError(
            f"within must name a submodule of the model, whose parameters and MACs the budget then counts; got "
            f"{within!r}. The model's top-level modules: {children}."
        )


def _check_selection(scope: str, max_sparsity: float) -> None:
    """Raise on an unknown ``scope`` or a ``max_sparsity`` outside (0, 1)."""
    if scope not in ("global", "layer"):
        raise RegrowError(f"unknown scope {scope!r}; allowed values: global, layer.")
    if not 0.0 < max_sparsity < 1.0:
        raise RegrowError(
            f"max_sparsity must be in (0, 1): the largest share of any group's units removed; got {max_sparsity!r}."
        )
