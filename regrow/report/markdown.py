"""Render a RunReport as Markdown for people."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from regrow.objectives import shown
from regrow.report.divergence import guard_section
from regrow.report.format import human as human
from regrow.report.format import pct as pct
from regrow.report.format import table as table
from regrow.report.speed import latency_cell, measured_speedup
from regrow.report.structure import _rounding as _rounding
from regrow.report.structure import _structure

if TYPE_CHECKING:
    from regrow.measure import Snapshot


class _Report(Protocol):
    """What rendering reads from a :class:`~regrow.report.RunReport`.

    A protocol, not the class itself: ``regrow.report.run_report`` imports this module to write ``report.md``,
    and importing the class back here, even for type checking only, would close an import cycle.
    """

    name: str
    config: dict[str, Any]
    environment: dict[str, Any]
    prune: dict[str, Any]
    snapshots: dict[str, Snapshot]
    recovery: dict[str, Any]
    timings: dict[str, float]
    export: dict[str, Any]
    notes: list[str]

    @property
    def drop(self) -> float: ...

    @property
    def recovered_fraction(self) -> float | None: ...


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


def render_markdown(report: _Report) -> str:
    """The whole ``report.md``: one section after another, always in this order."""
    s = report.snapshots
    stages = [k for k in ("baseline", "pruned", "recovered") if k in s]
    base, pruned, rec = s["baseline"], s["pruned"], s["recovered"]
    spec = report.prune
    out: list[str] = [
        *_headline(report, base),
        *_accuracy(report, stages, base, pruned, rec),
        *_strategy(spec),
        *_sensitivity(spec),
        *_allocation(spec),
        *_size_and_speed(report, stages),
        *_acceleration(spec),
        *_structure(spec),
        *_recovery(report),
        *guard_section(report.recovery),
        *_per_target_sparsity(spec, rec),
        *_excluded_classifier(spec),
        *_timings(report),
        *_export(report),
        *_notes(report),
        *_environment(report),
    ]
    return "\n".join(out) + "\n"


def _headline(report: _Report, base: Snapshot) -> list[str]:
    """The title and one sentence on how the run pruned and recovered."""
    spec = report.prune
    return [
        f"# regrow report: {report.name}",
        "",
        f"Pattern `{spec.get('pattern')}`, criterion `{spec.get('criterion')}`, scope `{spec.get('scope')}`, "
        f"schedule `{report.config.get('schedule', {}).get('name')}`, recovery "
        f"`{report.recovery.get('method')}`. "
        + (
            "Perplexities and accuracies"
            if base.perplexity is not None
            else "Accuracies"
            if base.metric == "accuracy"
            else "Measurements"
        )
        + f" are on the held-out test split ({base.samples} "
        + ("tokens" if base.perplexity is not None else "samples")
        + "), which recovery never sees.",
    ]


def perplexity_sentence(base: Snapshot, pruned: Snapshot, rec: Snapshot) -> str:
    """What pruning did to a language model's test perplexity, and how much of the rise recovery won back."""
    b, p, r = base.perplexity, pruned.perplexity, rec.perplexity
    assert b is not None and p is not None and r is not None
    text = f"Pruning took test perplexity from {b:.3f} to {p:.3f} ({100 * (p / b - 1):+.1f}%)"
    if p > b and r <= b:
        text += f"; recovery brought it to {r:.3f}, all of the rise won back and more"
    elif p > b and r < p:
        text += f"; recovery brought it to {r:.3f}, {100 * (p - r) / (p - b):.1f}% of the rise won back"
    else:
        text += f"; after recovery it is {r:.3f}"
    return text + f" ({100 * (r / b - 1):+.1f}% against the baseline)."


def _perplexity(report: _Report, stages: list[str], base: Snapshot, pruned: Snapshot, rec: Snapshot) -> list[str]:
    """A language model's table per stage: perplexity, then accuracy and loss per real token."""
    s = report.snapshots
    rows = [[k, f"{s[k].perplexity:.3f}", pct(s[k].accuracy), f"{s[k].loss:.4f}"] for k in stages]
    return [
        "",
        "## Perplexity",
        "",
        table(["stage", "test perplexity", "next-token accuracy", "token loss"], rows),
        "",
        perplexity_sentence(base, pruned, rec),
    ]


def _similarity(report: _Report, stages: list[str], base: Snapshot, pruned: Snapshot, rec: Snapshot) -> list[str]:
    """An objective other than accuracy (an encoder's embedding): its metric and loss per stage."""
    s, metric = report.snapshots, base.metric
    rows = [[k, f"{s[k].accuracy:.4f}", f"{s[k].loss:.4f}"] for k in stages]
    won = (
        (rec.accuracy - pruned.accuracy) / (base.accuracy - pruned.accuracy)
        if base.accuracy > pruned.accuracy
        else None
    )
    return [
        "",
        f"## Test {metric}",
        "",
        "Measured against the dense model's outputs on the same inputs (the baseline is the dense model itself).",
        "",
        table(["stage", f"test {metric}", "test loss"], rows),
        "",
        f"Pruning took it from {base.accuracy:.4f} to {pruned.accuracy:.4f}; after recovery {rec.accuracy:.4f}"
        + (f" ({100 * won:.1f}% of the drop won back)." if won is not None else "."),
    ]


def _accuracy(report: _Report, stages: list[str], base: Snapshot, pruned: Snapshot, rec: Snapshot) -> list[str]:
    """The accuracy table per stage, what pruning cost and recovery won back, and the costliest targets."""
    if base.perplexity is not None and pruned.perplexity is not None and rec.perplexity is not None:
        return _perplexity(report, stages, base, pruned, rec)
    if base.metric != "accuracy":
        return _similarity(report, stages, base, pruned, rec)
    s = report.snapshots
    out = ["", "## Accuracy", ""]
    out.append(
        table(["stage", "test accuracy", "test loss"], [[k, pct(s[k].accuracy), f"{s[k].loss:.4f}"] for k in stages])
    )
    drop = report.drop
    frac = report.recovered_fraction
    out.append("")
    out.append(recovery_sentence(drop, rec.accuracy - pruned.accuracy, frac))
    out.append(f"Recovered vs baseline: {100 * (rec.accuracy - base.accuracy):+.2f} points.")
    costliest = report.prune.get("costliest")
    if costliest and drop > 0:
        out += [
            "",
            "**Why accuracy dropped in the pruned stage.** Pruned alone to the sparsity it got, each of these "
            "raises the calibration loss most (from the sensitivity analysis):",
        ]
        out += [f"- `{name}` at {100 * level:.1f}%: loss +{rise:.4f}" for name, rise, level in costliest]
    return out


def _strategy(spec: dict[str, Any]) -> list[str]:
    """The automatic strategy: the measured facts it decided from, then each decision (empty without one)."""
    strategy = spec.get("strategy")
    if not strategy:
        return []
    from regrow.strategy import Decision  # lazily: only auto runs need it

    facts = strategy["facts"]
    out = ["", "## Strategy (auto)", ""]
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
    return out


def _sensitivity(spec: dict[str, Any]) -> list[str]:
    """The sensitivity analysis: calibration loss of each target or group pruned alone, per level."""
    sens = spec.get("sensitivity")
    if not sens:
        return []
    out = ["", "## Sensitivity", ""]
    out.append(
        f"Each {'group' if sens['pattern'] in ('channel', 'head') else 'target'} pruned alone "
        f"({sens['pattern']}, {sens['criterion']}); loss on {sens['samples']} calibration samples "
        f"(baseline {sens['baseline_loss']:.4f}). Plot: `sensitivity.png`; data: `sensitivity.json`."
    )
    out.append("")
    header = ["target / group", *[f"loss at {lv:g}" for lv in sens["levels"]]]
    out.append(table(header, [[f"`{c['name']}`", *[f"{v:.4f}" for v in c["loss"]]] for c in sens["curves"]]))
    return out


def _allocation(spec: dict[str, Any]) -> list[str]:
    """The planned allocation: method, budget, notes and the relative sparsity of each target or group."""
    allocation = spec.get("allocation")
    if not allocation:
        return []
    out = ["", "## Allocation", ""]
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
    return out


def _size_and_speed(report: _Report, stages: list[str]) -> list[str]:
    """The size and speed table per stage, the measured speed-up, and the note on what the pattern buys."""
    spec = report.prune
    out = ["", "## Size and speed", ""]
    out.append(table(["", *stages], _size_rows(report.snapshots, stages, bool(spec.get("structure")))))
    out += measured_speedup(spec.get("speed"))
    out += ["", spec.get("speed_note", "")]
    return out


def _size_rows(s: dict[str, Snapshot], stages: list[str], structure: bool) -> list[list[Any]]:
    """The rows of the size and speed table; sparsity rows only when weights were zeroed, not removed."""
    lat = [s[k].latency for k in stages]
    lat_label = (
        f"latency, median ms (batch {lat[0].batch_size}, {lat[0].threads} threads, {lat[0].device})"
        if lat[0]
        else "latency"
    )
    rows = [
        ["parameters"] + [human(s[k].params) for k in stages],
        ["nonzero parameters"] + [human(s[k].nonzero_params) for k in stages],
        ["dense MACs per sample"] + [human(s[k].macs) for k in stages],
        [lat_label] + [latency_cell(s[k].latency) for k in stages],
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
    return rows


def _acceleration(spec: dict[str, Any]) -> list[str]:
    """2:4 weights packed for sparse tensor cores on a copy of the recovered model (accelerate.enabled)."""
    acc = spec.get("acceleration")
    if not acc:
        return []
    accuracy = acc.get("accuracy")
    line = "no layer was converted" if accuracy is None else f"test accuracy of the packed copy: {pct(accuracy)}"
    return ["", "## 2:4 on sparse tensor cores", "", acc["markdown"].rstrip(), "", line[0].upper() + line[1:] + "."]


def _recovery(report: _Report) -> list[str]:
    """How recovery ran and ended, what its options did, the per-epoch history and the curve plot."""
    rec_info = report.recovery
    snapshots = getattr(report, "snapshots", {})
    metric = snapshots["baseline"].metric if "baseline" in snapshots else "accuracy"
    out = ["", "## Recovery", "", _recovery_run(rec_info, metric)]
    details = rec_info.get("details") or {}
    if details.get("compute"):
        out.append(_compute(details["compute"]))
    if details.get("rewind"):
        out.append(_rewind(details["rewind"]))
    out += _recovery_options(rec_info, details)
    history = rec_info.get("history", [])
    if history:
        out += [
            "",
            _history_table(history, sparsity=not report.prune.get("structure"), metric=metric),
            "",
            f"Train {metric} is the running {metric} on the (augmented) training batches; a growing train - val "
            "gap with a rising validation loss is over-fitting, which early stopping reports by name.",
        ]
    if report.export.get("curve_plot"):
        out += ["", f"![validation curve]({report.export['curve_plot']})"]
    return out


def _recovery_run(rec_info: dict[str, Any], metric: str = "accuracy") -> str:
    """One sentence: the method, epochs run, the best epoch and why recovery stopped."""
    phases = rec_info.get("phases")
    run = (
        f"Method `{rec_info.get('method')}` then weight sharing: {rec_info.get('epochs_run')} epochs run "
        f"({phases['recovery']} + {phases['sharing']})"
        if phases
        else f"Method `{rec_info.get('method')}`: {rec_info.get('epochs_run')} epochs run"
    )
    note = f", {rec_info['best_note']}" if rec_info.get("best_note") else ""
    return (
        f"{run}, best epoch {rec_info.get('best_epoch')} (validation {metric} "
        f"{shown(metric, rec_info.get('best_val_accuracy'))}{note}); ended by: {rec_info.get('stop_reason')}."
    )


def _compute(c: dict[str, Any]) -> str:
    """One sentence on how recovery computed: its precision, and channels-last / torch.compile when used."""
    extras = [
        *(["channels-last memory format"] if c.get("channels_last") else []),
        *(["torch.compile"] if c.get("compile") else []),
        *([f"{c['processes']} processes (DistributedDataParallel)"] if c.get("processes") else []),
    ]
    how = f" on {c.get('device', 'an unknown device')}" + (f", {' and '.join(extras)}" if extras else "")
    weights = c.get("weights", "float32")
    if c.get("precision", "fp32") == "fp32":
        return f"Precision: recovery trained and validated in {weights} (no autocast){how}."
    scaler = (
        f"; a gradient scaler skipped {c['skipped_steps']} step{'' if c['skipped_steps'] == 1 else 's'} whose "
        "gradients overflowed"
        if "skipped_steps" in c
        else ""
    )
    return (
        f"Precision: recovery trained and validated with {c['precision']} autocast{how} (weights, gradients and "
        f"optimizer state in {weights}{scaler}). The accuracies of the stages above are measured without autocast, "
        f"in {weights}."
    )


def _rewind(r: dict[str, Any]) -> str:
    """One sentence on rewinding: which schedule the learning rate replays, from where, and how fast."""
    o = r["original"]
    if r.get("start") is None:  # reports written before the start was recorded
        start = "its end minus the recovery length" if r["rewind_epoch"] is None else f"epoch {r['rewind_epoch']:g}"
    else:
        start = f"epoch {r['start']:g}" + (
            " (the default: its end minus the recovery length, at least 0)" if r["rewind_epoch"] is None else ""
        )
    return (
        f"Rewinding ({r['kind']}): the learning rate replays the original {o['schedule']} schedule (peak "
        f"{o['lr']:g}, {o['epochs']:g} epochs"
        + (
            "; assumed, as no original schedule was given: cosine from the recovery lr over twice the recovery epochs"
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


def _recovery_options(rec_info: dict[str, Any], details: dict[str, Any]) -> list[str]:
    """One sentence per recovery option the run used: averaging, dynamic sparsity, sharing, stopping, transfer."""
    out: list[str] = []
    if details.get("ema"):
        out.append(
            f"Weight averaging: validation, the kept checkpoint and the recovered model use an exponential moving "
            f"average of the weights (decay {details['ema']['decay']:g}); training metrics are the trained weights'."
        )
    if details.get("dynamic"):
        d = details["dynamic"]
        out.append(
            f"Dynamic sparsity ({'RigL' if d['regrow'] == 'gradient' else 'SET'}): {d['updates']} mask updates "
            f"before the kept epoch replaced {d['weights_replaced']} weights in all; each update regrew as many "
            "weights as it dropped. Only epochs after the first update can be kept."
            + (
                f" {d['updates_after_kept_epoch']} later updates came after the kept epoch and are not in the model."
                if d.get("updates_after_kept_epoch")
                else ""
            )
            + (
                f" {d['kept_zeros']} kept weights are exactly zero at the end (regrown at zero and not moved since), "
                "so the sparsity counted from the weights is a little above the masks'."
                if d.get("kept_zeros")
                else ""
            )
        )
    sharing = rec_info.get("sharing") or details.get("sharing")
    if sharing:
        out.append(_sharing(sharing))
    if "baseline_val_accuracy" in details:
        out.append(
            f"Target-driven stopping compared validation accuracy with the baseline's "
            f"{pct(details['baseline_val_accuracy'])}."
        )
    if "source_test_accuracy" in rec_info:
        out.append(
            f"Transfer: the source model's test accuracy on its own task was {pct(rec_info['source_test_accuracy'])}."
        )
    return out


def _sharing(sharing: dict[str, Any]) -> str:
    """One sentence on weight sharing: the k asked for and the targets' size dense, sparse and shared."""
    k, values, index_bits = sharing["k"], sharing["values"], sharing["index_bits"]
    asked = f"k = {k}" if values >= k else f"k = {k} asked, at most {values} values per target (fewer weights survive)"
    return (
        f"Weight sharing, {asked}: the targets take {human(sharing['dense_bits'] / 8, 'B')} dense, "
        f"{human(sharing['sparse_bits'] / 8, 'B')} sparse (bitmask + float32 values) and "
        f"{human(sharing['shared_bits'] / 8, 'B')} shared (bitmask + up to {index_bits}-bit "
        "indices + codebooks); exported as `shared.safetensors`."
    )


def _history_table(history: list[dict[str, Any]], sparsity: bool, metric: str = "accuracy") -> str:
    """The per-epoch recovery table; the sparsity column only when weights were zeroed, not removed."""
    short = "acc" if metric == "accuracy" else metric
    scale = 100 if metric == "accuracy" else 1  # the gap in points, or in the metric's own units
    return table(
        ["epoch", "train loss", f"train {short}", "val loss", f"val {short}", "train - val", "lr"]
        + (["sparsity"] if sparsity else []),
        [
            [
                h["epoch"],
                "" if h["train_loss"] is None else f"{h['train_loss']:.4f}",
                "" if h["train_accuracy"] is None else shown(metric, h["train_accuracy"]),
                f"{h['val_loss']:.4f}",
                shown(metric, h["val_accuracy"]),
                ""
                if h["train_accuracy"] is None
                else f"{scale * (h['train_accuracy'] - h['val_accuracy']):+.{1 if scale == 100 else 4}f}",
                "" if h["lr"] is None else f"{h['lr']:.2e}",
            ]
            + ([pct(h["sparsity"])] if sparsity else [])
            for h in history
        ],
    )


def _per_target_sparsity(spec: dict[str, Any], rec: Snapshot) -> list[str]:
    """The recovered model's sparsity per target (empty for channel / head removal, which leaves none)."""
    if spec.get("structure") or not rec.per_target_sparsity:
        return []
    return [
        "",
        "## Per-target sparsity (recovered model)",
        "",
        table(["target", "sparsity"], [[f"`{k}`", pct(v)] for k, v in rec.per_target_sparsity.items()]),
    ]


def _excluded_classifier(spec: dict[str, Any]) -> list[str]:
    """A line naming the final classifier when the default targets left it dense."""
    excluded = spec.get("excluded_classifier")
    if not excluded:
        return []
    return ["", f"`{excluded}` is the final classifier and was left dense (default targets exclude it)."]


def _timings(report: _Report) -> list[str]:
    """The seconds each stage of the run took."""
    rows = [[k, f"{v:.2f}"] for k, v in report.timings.items()]
    return ["", "## Stage timings", "", table(["stage", "seconds"], rows)]


def _export(report: _Report) -> list[str]:
    """The exported files and the reload check (empty when nothing was exported)."""
    if not report.export:
        return []
    out = ["", "## Export", ""]
    for key in ("model", "masks", "config"):
        if report.export.get(key):
            out.append(f"- `{report.export[key]}`")
    check = report.export.get("reload_check")
    if check:
        verdict = "matches" if check["matches"] else "DOES NOT match"
        snapshots = getattr(report, "snapshots", {})
        metric = snapshots["recovered"].metric if "recovered" in snapshots else "accuracy"
        out.append(
            f"- Reloaded `model.safetensors` into a fresh model: test {metric} {shown(metric, check['accuracy'])}, "
            f"which {verdict} the recovered {metric}."
        )
    hf = report.export.get("hf")
    if hf:
        out.append(
            f"- `{hf['folder']}/`: a Hugging Face folder that `from_pretrained` loads with no regrow installed."
            if hf["written"]
            else f"- No Hugging Face folder: {hf['why']}"
        )
    return out


def _notes(report: _Report) -> list[str]:
    """The run's notes, one bullet each (empty without any)."""
    if not report.notes:
        return []
    return ["", "## Notes", "", *[f"- {n}" for n in report.notes]]


def _environment(report: _Report) -> list[str]:
    """The library versions and machine, skipping what is unknown."""
    return ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in report.environment.items() if v is not None)]
