"""Render a RunReport as Markdown for people."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regrow.report import RunReport


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}".strip()
    return f"{n:g} {unit}".strip()


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def recovery_sentence(drop: float, gained: float, frac: float | None) -> str:
    """One sentence on what pruning cost and how much recovery won back (fractions of 1, not points)."""
    if frac is None:
        return f"Pruning cost no test accuracy (change {100 * -drop + 0.0:+.2f} points)."  # + 0.0: no -0.00
    if frac > 1:
        return (
            f"Pruning dropped test accuracy by {100 * drop:.2f} points; recovery won back all of it and "
            f"{100 * (gained - drop):.2f} points more."
        )
    if gained <= 0:
        return (
            f"Pruning dropped test accuracy by {100 * drop:.2f} points; recovery did not win any of it back "
            f"(change during recovery {100 * gained:+.2f} points)."
        )
    return (
        f"Pruning dropped test accuracy by {100 * drop:.2f} points; recovery won back "
        f"{100 * gained:.2f} points, {100 * frac:.1f}% of the drop."
    )


def render_markdown(report: RunReport) -> str:
    s = report.snapshots
    stages = [k for k in ("baseline", "pruned", "recovered") if k in s]
    base, pruned, rec = s["baseline"], s["pruned"], s["recovered"]
    spec = report.prune
    out: list[str] = [f"# regrow report: {report.name}", ""]
    out.append(
        f"Pattern `{spec.get('pattern')}`, criterion `{spec.get('criterion')}`, scope `{spec.get('scope')}`, "
        f"schedule `{report.config.get('schedule', {}).get('name')}`, recovery "
        f"`{report.recovery.get('method')}`. Accuracies are on the held-out test split "
        f"({base.samples} samples), which recovery never sees."
    )
    out += ["", "## Accuracy", ""]
    out.append(
        table(["stage", "test accuracy", "test loss"], [[k, pct(s[k].accuracy), f"{s[k].loss:.4f}"] for k in stages])
    )
    drop = report.drop
    frac = report.recovered_fraction
    out.append("")
    out.append(recovery_sentence(drop, rec.accuracy - pruned.accuracy, frac))
    out.append(f"Recovered vs baseline: {100 * (rec.accuracy - base.accuracy):+.2f} points.")
    costliest = spec.get("costliest")
    if costliest and drop > 0:
        out += [
            "",
            "**Why accuracy dropped in the pruned stage.** Pruned alone to the sparsity it got, each of these "
            "raises the calibration loss most (from the sensitivity analysis):",
        ]
        out += [f"- `{name}` at {100 * level:.1f}%: loss +{rise:.4f}" for name, rise, level in costliest]

    strategy = spec.get("strategy")
    if strategy:
        from regrow.strategy import Decision

        facts = strategy["facts"]
        out += ["", "## Strategy (auto)", ""]
        out.append(
            f"Measured: {human(facts['params'])} parameters, {human(facts['macs'])} MACs per sample, layers "
            + ", ".join(f"{k} {v}" for k, v in facts["layers"].items())
            + f"; {facts['train_samples']} training samples"
            + (", image inputs" if facts["image_inputs"] else "")
            + (f" ({facts['image_side']} pixels on the shorter side)" if facts.get("image_side") else "")
            + f"; budget {', '.join(f'{k} {v:g}' for k, v in facts['budget'].items())}."
        )
        out.append("")
        out += [f"- {Decision(**d).line()}" for d in strategy["decisions"]]

    sens = spec.get("sensitivity")
    if sens:
        out += ["", "## Sensitivity", ""]
        out.append(
            f"Each {'group' if sens['pattern'] in ('channel', 'head') else 'target'} pruned alone "
            f"({sens['pattern']}, {sens['criterion']}); loss on {sens['samples']} calibration samples "
            f"(baseline {sens['baseline_loss']:.4f}). Plot: `sensitivity.png`; data: `sensitivity.json`."
        )
        out.append("")
        header = ["target / group", *[f"loss at {lv:g}" for lv in sens["levels"]]]
        out.append(table(header, [[f"`{c['name']}`", *[f"{v:.4f}" for v in c["loss"]]] for c in sens["curves"]]))

    allocation = spec.get("allocation")
    if allocation:
        out += ["", "## Allocation", ""]
        out.append(
            f"Method `{allocation['method']}` for budget "
            f"{', '.join(f'{k} {v:g}' for k, v in allocation['budget'].items())}; relative sparsities below "
            "(the budget scales them to fit exactly); reusable as `prune.allocation_file: allocation.json`."
        )
        out += [f"- {n}" for n in allocation.get("notes", [])]
        out.append("")
        out.append(
            table(
                ["target / group", "planned sparsity"],
                [[f"`{k}`", pct(v)] for k, v in allocation["per_target"].items()],
            )
        )

    out += ["", "## Size and speed", ""]
    lat = [s[k].latency for k in stages]
    lat_label = (
        f"latency, median ms (batch {lat[0].batch_size}, {lat[0].threads} threads, {lat[0].device})"
        if lat[0]
        else "latency"
    )
    structure = spec.get("structure")
    rows = [
        ["parameters"] + [human(s[k].params) for k in stages],
        ["nonzero parameters"] + [human(s[k].nonzero_params) for k in stages],
        ["dense MACs per sample"] + [human(s[k].macs) for k in stages],
        [lat_label] + [f"{s[k].latency.median_ms:.3f}" if s[k].latency else "n/a" for k in stages],
        ["saved size (dense safetensors)"] + [human(s[k].size_bytes, "B") for k in stages],
    ]
    gpu = [s[k].latency_gpu for k in stages]
    if gpu[0] is not None:
        rows.insert(
            4,
            [f"GPU latency, median ms (batch {gpu[0].batch_size}, {gpu[0].device})"]
            + [f"{g.median_ms:.3f}" if g else "n/a" for g in gpu],
        )
    if not structure:
        rows.insert(2, ["sparsity over targets"] + [pct(s[k].target_sparsity) for k in stages])
        rows.append(
            ["sparse size estimate (bitmask + nonzeros)"] + [human(s[k].sparse_size_bytes, "B") for k in stages]
        )
    out.append(table(["", *stages], rows))
    speed = spec.get("speed")
    if speed:
        b, r = speed["baseline"], speed["recovered"]
        out.append("")
        out.append(
            f"Measured CPU speed-up, baseline / recovered: **{speed['speedup']:.2f}x** ({b['median_ms']:.3f} ms vs "
            f"{r['median_ms']:.3f} ms median, batch {b['batch_size']}, {b['threads']} threads, {b['repeats']} "
            "forward passes of each model, interleaved in one process)."
        )
    out += ["", spec.get("speed_note", "")]

    if structure:
        out += ["", "## Structure", ""]
        budget = ", ".join(f"{k} = {v:g}" for k, v in structure["budget"].items())
        eq = structure["equivalence"]
        out.append(
            f"Budget {budget}: MACs kept {pct(structure['macs_ratio'])}, parameters kept "
            f"{pct(structure['params_ratio'])}; {structure['units_removed']} of {structure['units_total']} "
            f"{'heads' if spec.get('pattern') == 'head' else 'channel units'} removed "
            f"({structure['evaluations']} candidate selections measured)." + _rounding(structure)
        )
        rounds = spec.get("structure_rounds")
        if rounds:
            out.append("")
            out.append(f"In {len(rounds)} rounds of shrink -> recover, each against the model it started from:")
            out.append("")
            out.append(
                table(
                    ["round", "budget for the round", "MACs kept", "parameters kept", "units removed"],
                    [
                        [
                            i + 1,
                            ", ".join(f"{k} = {v:.3g}" for k, v in r["budget"].items()),
                            pct(r["macs_ratio"]),
                            pct(r["params_ratio"]),
                            r["units_removed"],
                        ]
                        for i, r in enumerate(rounds)
                    ],
                )
            )
            out.append("")
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
        out.append("")
        out.append(
            table(
                ["group (first layer)", "kind", "coupled tensors", "units before", "units after", "left out because"],
                [
                    [
                        f"`{g['name']}`",
                        g["kind"],
                        len(g["members"]),
                        g["units_before"],
                        g["units_after"],
                        g["excluded"] or "",
                    ]
                    for g in structure["groups"]
                    if g["excluded"] != "not a target"
                ],
            )
        )
        for w in structure.get("warnings", []):
            out += ["", f"Warning: {w}"]

    rec_info = report.recovery
    out += ["", "## Recovery", ""]
    phases = rec_info.get("phases")
    run = (
        f"Method `{rec_info.get('method')}` then weight sharing: {rec_info.get('epochs_run')} epochs run "
        f"({phases['recovery']} + {phases['sharing']})"
        if phases
        else f"Method `{rec_info.get('method')}`: {rec_info.get('epochs_run')} epochs run"
    )
    note = f", {rec_info['best_note']}" if rec_info.get("best_note") else ""
    out.append(
        f"{run}, best epoch {rec_info.get('best_epoch')} (validation accuracy "
        f"{pct(rec_info.get('best_val_accuracy'))}{note}); ended by: {rec_info.get('stop_reason')}."
    )
    details = rec_info.get("details") or {}
    if details.get("rewind"):
        r = details["rewind"]
        o = r["original"]
        if r.get("start") is None:  # reports written before the start was recorded
            start = "its end minus the recovery length" if r["rewind_epoch"] is None else f"epoch {r['rewind_epoch']:g}"
        else:
            start = f"epoch {r['start']:g}" + (
                " (the default: its end minus the recovery length, at least 0)" if r["rewind_epoch"] is None else ""
            )
        out.append(
            f"Rewinding ({r['kind']}): the learning rate replays the original {o['schedule']} schedule (peak "
            f"{o['lr']:g}, {o['epochs']:g} epochs"
            + (
                "; assumed, as no original schedule was given: cosine from the recovery lr over twice the recovery "
                "epochs"
                if r.get("assumed")
                else ""
            )
            + f") from {start}"
            + (", and the surviving weights were reset to their values there." if r["kind"] == "weights" else ".")
            + (
                f" Recovery is longer than the rest of that schedule, so the rest was replayed "
                f"{1 / r['pace']:.2f}x slower, ending where the original ended."
                if r.get("pace", 1.0) < 1.0
                else ""
            )
        )
    if details.get("ema"):
        out.append(
            f"Weight averaging: validation, the kept checkpoint and the recovered model use an exponential moving "
            f"average of the weights (decay {details['ema']['decay']:g}); training metrics are the trained weights'."
        )
    if details.get("dynamic"):
        d = details["dynamic"]
        out.append(
            f"Dynamic sparsity ({'RigL' if d['regrow'] == 'gradient' else 'SET'}): {d['updates']} mask updates "
            f"replaced {d['weights_replaced']} weights in all; each update regrew as many weights as it dropped."
            + (
                f" {d['kept_zeros']} kept weights are exactly zero at the end (regrown at zero and not moved since), "
                "so the sparsity counted from the weights is a little above the masks'."
                if d.get("kept_zeros")
                else ""
            )
        )
    sharing = rec_info.get("sharing") or details.get("sharing")
    if sharing:
        k, values, index_bits = sharing["k"], sharing["values"], sharing["index_bits"]
        asked = (
            f"k = {k}" if values >= k else f"k = {k} asked, at most {values} values per target (fewer weights survive)"
        )
        out.append(
            f"Weight sharing, {asked}: the targets take {human(sharing['dense_bits'] / 8, 'B')} dense, "
            f"{human(sharing['sparse_bits'] / 8, 'B')} sparse (bitmask + float32 values) and "
            f"{human(sharing['shared_bits'] / 8, 'B')} shared (bitmask + up to {index_bits}-bit "
            "indices + codebooks); exported as `shared.safetensors`."
        )
    if "baseline_val_accuracy" in details:
        out.append(
            f"Target-driven stopping compared validation accuracy with the baseline's "
            f"{pct(details['baseline_val_accuracy'])}."
        )
    if "source_test_accuracy" in rec_info:
        out.append(
            f"Transfer: the source model's test accuracy on its own task was {pct(rec_info['source_test_accuracy'])}."
        )
    history = rec_info.get("history", [])
    if history:
        out.append("")
        out.append(
            table(
                ["epoch", "train loss", "train acc", "val loss", "val acc", "train - val", "lr"]
                + ([] if structure else ["sparsity"]),
                [
                    [
                        h["epoch"],
                        "" if h["train_loss"] is None else f"{h['train_loss']:.4f}",
                        "" if h["train_accuracy"] is None else pct(h["train_accuracy"]),
                        f"{h['val_loss']:.4f}",
                        pct(h["val_accuracy"]),
                        ""
                        if h["train_accuracy"] is None
                        else f"{100 * (h['train_accuracy'] - h['val_accuracy']):+.1f}",
                        "" if h["lr"] is None else f"{h['lr']:.2e}",
                    ]
                    + ([] if structure else [pct(h["sparsity"])])
                    for h in history
                ],
            )
        )
        out.append("")
        out.append(
            "Train accuracy is the running accuracy on the (augmented) training batches; a growing train - val "
            "gap with a rising validation loss is over-fitting, which early stopping reports by name."
        )
    if report.export.get("curve_plot"):
        out += ["", f"![validation curve]({report.export['curve_plot']})"]

    if not structure and rec.per_target_sparsity:
        out += ["", "## Per-target sparsity (recovered model)", ""]
        out.append(table(["target", "sparsity"], [[f"`{k}`", pct(v)] for k, v in rec.per_target_sparsity.items()]))
    excluded = spec.get("excluded_classifier")
    if excluded:
        out.append("")
        out.append(f"`{excluded}` is the final classifier and was left dense (default targets exclude it).")

    out += ["", "## Stage timings", ""]
    out.append(table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in report.timings.items()]))

    if report.export:
        out += ["", "## Export", ""]
        for key in ("model", "masks", "config"):
            if report.export.get(key):
                out.append(f"- `{report.export[key]}`")
        check = report.export.get("reload_check")
        if check:
            verdict = "matches" if check["matches"] else "DOES NOT match"
            out.append(
                f"- Reloaded `model.safetensors` into a fresh model: test accuracy {pct(check['accuracy'])}, "
                f"which {verdict} the recovered accuracy."
            )

    if report.notes:
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in report.notes]

    env = report.environment
    out += ["", "## Environment", ""]
    out.append(", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
    return "\n".join(out) + "\n"


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
