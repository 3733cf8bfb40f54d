"""The report's timings: a stage's latency (marked when noisy) and the dense-vs-recovered comparison, claimed as
a speed-up only for a shrunk model whose interleaved timings were steady (``regrow.measure.latency.pair_noise``)."""

from __future__ import annotations

from typing import Any

from regrow.measure.latency import NOISY_SPREAD


def latency_cell(lat: Any) -> str:
    """A stage's median latency; marked when its timings spread too far to compare (a busy machine)."""
    if not lat:
        return "n/a"
    return f"{lat.median_ms:.3f}" + (
        f" (noisy: p10 {lat.p10_ms:.3f}, p90 {lat.p90_ms:.3f})" if lat.spread > NOISY_SPREAD else ""
    )


def measured_speedup(speed: dict[str, Any] | None) -> list[str]:
    """The interleaved baseline / recovered timings on the run's device, when the run measured them: a speed-up
    only for a shrunk model whose timings were not noisy."""
    if not speed:
        return []
    b, r = speed["baseline"], speed["recovered"]
    device = speed.get("device", "cpu")
    where = "CPU" if device == "cpu" else f"GPU ({device})"
    timing = (
        f"({b['median_ms']:.3f} ms vs {r['median_ms']:.3f} ms median, batch {b['batch_size']}, {b['threads']} threads, "
        f"{b['repeats']} forward passes of each model, interleaved in one process)"
    )
    if speed.get("noisy"):
        return [
            "",
            f"**No speed-up claimed:** the {where} timings were noisy ({speed['noisy']}) {timing}; the machine "
            "was busy. Rerun on an idle machine, or with fewer threads (`regrow run --threads 1`).",
        ]
    if not speed.get("shrunk", True):
        return [
            "",
            f"Measured {where} timing ratio, baseline / recovered: {speed['speedup']:.2f}x {timing}. The "
            "pattern keeps every dense shape, so this ratio is timing noise, not a speed-up.",
        ]
    out = ["", f"Measured {where} speed-up, baseline / recovered: **{speed['speedup']:.2f}x** {timing}."]
    out += [
        f"At batch {row['batch_size']}: "
        + (
            f"no speed-up claimed, noisy timings ({row['noisy']})."
            if row.get("noisy")
            else f"**{row['speedup']:.2f}x** ({row['baseline']['median_ms']:.3f} ms vs "
            f"{row['recovered']['median_ms']:.3f} ms)."
        )
        for row in speed.get("batches", [])[1:]
    ]
    out += [f"**Slower than dense:** {line}." for line in speed.get("slower", [])]
    return out
