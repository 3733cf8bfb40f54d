"""The report's "Divergence guard" section: the guard's rule, every rollback and its cause, and which epoch the
recovered model is (when the best-epoch rule handed back an earlier epoch than the last)."""

from __future__ import annotations

from typing import Any


def guard_section(rec_info: dict[str, Any]) -> list[str]:
    """The section's Markdown lines from the report's recovery section (empty for a report without a guard)."""
    phases = [
        ("baseline training", rec_info.get("baseline_guard")),
        ("transfer reference", rec_info.get("reference_guard")),
        ("recovery", (rec_info.get("details") or {}).get("guard")),
    ]
    rule = next((g for _, g in phases if g), None)
    if rule is None:  # a report written before the guard existed
        return []
    out = ["", "## Divergence guard", "", _rule(rule)]
    events = [(name, e) for name, g in phases if g for e in g["rollbacks"]]
    out.append(f"Rollbacks: {len(events)}." if events else "No rollback: no training diverged.")
    if events:
        out += ["", *[_rollback(name, e) for name, e in events]]
    kept = _kept(rec_info)
    return out + (["", kept] if kept else [])


def _rule(rule: dict[str, Any]) -> str:
    """One sentence: when a step diverged and what the guard then did."""
    factor = rule["explode_factor"]
    above = (
        f", or above {factor:g} x the larger of the median of the last {rule['window']} step losses and ln(classes)"
        if factor
        else ""
    )
    return (
        f"Every training step was watched: a step whose loss is not finite{above}, or an epoch whose validation loss "
        f"is not finite, rolls its epoch back to the start with the learning rate x{rule['lr_factor']:g}, at most "
        f"{rule['retries']} times per training, then stops the run. An epoch with a non-finite loss is never kept."
    )


def _rollback(name: str, e: dict[str, Any]) -> str:
    """One bullet: where a rollback happened, why, and the learning rate before and after."""
    where = name + (f" round {e['round']}" if "round" in e else "") + (" (weight sharing)" if "phase" in e else "")
    step = f", step {e['step']} (batch {e['batch']})" if e.get("step") else ""
    return (
        f"- {where}, epoch {e['epoch']}{step}: {e['cause']}; rolled back to the start of the epoch, learning rate "
        f"{e['lr_before']:.4g} -> {e['lr_after']:.4g} (the schedule x{e['lr_scale']:g} from then on)."
    )


def _kept(rec_info: dict[str, Any]) -> str | None:
    """Which epoch the recovered model is, when the best-epoch rule handed back an earlier one than the last."""
    last = (rec_info.get("rounds") or [rec_info])[-1]
    best, run = last.get("best_epoch"), last.get("epochs_run")
    scope = "In the last round, the" if rec_info.get("rounds") else "The"
    if best is None or not run or best >= run:
        return None
    if best == 0:
        return (
            f"{scope} recovered model is the model as it came in (epoch 0): no epoch of training beat it on "
            "validation, so the training was discarded."
        )
    n = run - best
    return (
        f"{scope} recovered model is the kept checkpoint of epoch {best} (best validation accuracy), not the last "
        f"epoch's: the {n} epoch{'s' if n > 1 else ''} after it {'were' if n > 1 else 'was'} discarded."
    )
