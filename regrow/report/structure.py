"""The report's structure section: what channel / head removal kept, its rounds and groups, and the rounding."""

from __future__ import annotations

from typing import Any

from regrow.report.format import pct, table


def _structure(spec: dict[str, Any]) -> list[str]:
    """What channel / head removal kept, its rounds, the equivalence check and each group (empty otherwise)."""
    structure = spec.get("structure")
    if not structure:
        return []
    out = ["", "## Structure", ""]
    budget = ", ".join(f"{k} = {v:g}" for k, v in structure["budget"].items())
    eq = structure["equivalence"]
    units = {"head": "heads", "channel+head": "channel units and heads"}.get(spec.get("pattern", ""), "channel units")
    within = f" (counted inside {structure['within']})" if structure.get("within") else ""
    out.append(
        f"Budget {budget}{within}: MACs kept {pct(structure['macs_ratio'])}, parameters kept "
        f"{pct(structure['params_ratio'])}; {structure['units_removed']} of {structure['units_total']} "
        f"{units} removed "
        f"({structure['evaluations']} candidate selections measured)." + _rounding(structure)
    )
    out += _structure_rounds(spec.get("structure_rounds"))
    out.append(
        f"Equivalence check {'passed' if eq['passed'] else 'FAILED'}: the shrunk model's outputs differ from "
        f"the masked simulation by at most {eq['max_abs_diff']:.3g} (tolerance {eq['tolerance']:.3g} = "
        f"{eq['atol']:g} + {eq['rtol']:g} x max |output|)."
    )
    if structure.get("converted_attention"):
        out.append(
            f"nn.MultiheadAttention replaced by regrow's equivalent with prunable heads at: "
            f"{', '.join(f'`{n}`' for n in structure['converted_attention'])} (arch.json records it)."
        )
    if structure.get("standins"):
        out.append(
            "torchvision or timm modules replaced by regrow's stand-ins, which compute the same outputs with "
            f"layers channel pruning can follow, at: {', '.join(f'`{n}`' for n in structure['standins'])} "
            "(arch.json records it)."
        )
    out.append("")
    out.append(_groups_table(structure["groups"]))
    for w in structure.get("warnings", []):
        out += ["", f"Warning: {w}"]
    return out


def _structure_rounds(rounds: list[dict[str, Any]] | None) -> list[str]:
    """The per-round table of a shrink -> recover run in several rounds (empty for a single shrink)."""
    if not rounds:
        return []
    rows = [
        [
            i + 1,
            ", ".join(f"{k} = {v:.3g}" for k, v in r["budget"].items()),
            pct(r["macs_ratio"]),
            pct(r["params_ratio"]),
            r["units_removed"],
        ]
        for i, r in enumerate(rounds)
    ]
    return [
        "",
        f"In {len(rounds)} rounds of shrink -> recover, each against the model it started from:",
        "",
        table(["round", "budget for the round", "MACs kept", "parameters kept", "units removed"], rows),
        "",
    ]


def _groups_table(groups: list[dict[str, Any]]) -> str:
    """The table of channel / head groups and their widths; groups that are no target at all are left out."""
    return table(
        ["group (first layer)", "kind", "coupled tensors", "units before", "units after", "left out because"],
        [
            [f"`{g['name']}`", g["kind"], len(g["members"]), g["units_before"], g["units_after"], g["excluded"] or ""]
            for g in groups
            if g["excluded"] != "not a target"
        ],
    )


def _rounding(structure: dict[str, Any]) -> str:
    from regrow.structural import ROUND_MIN_CHANNELS

    multiple = structure.get("round_to") or 1
    if multiple <= 1:
        return ""
    if structure.get("round_to_auto"):
        return (
            f" Kept widths of groups with at least {ROUND_MIN_CHANNELS} channels rounded down to multiples of "
            f"{multiple} (this device's default; round_to sets it)."
        )
    return (
        f" Kept widths rounded down to multiples of {multiple} (round_to; a group narrower than {multiple} "
        "is not rounded)."
    )
