"""Sensitivity analysis: what pruning each target (or coupled group) alone costs.

For every target — or, for structural patterns, every coupled group, pruned as a whole: a layer coupled by
a residual connection pruned alone would give a misleading answer — and every level, the target is
pruned to that level with the chosen criterion while everything else stays dense, and the loss and
accuracy are measured on a few calibration batches. The curves feed the allocation (which target can
take more sparsity at the least cost) and explain, in the report, where a pruned model's accuracy went.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regrow.batches import model_device, to_device, unpack
from regrow.errors import RegrowError
from regrow.io import atomic_write, atomic_write_text
from regrow.measure.cost import count_params, dense_macs
from regrow.measure.metrics import classification_metrics
from regrow.progress import bar

DEFAULT_LEVELS = (0.25, 0.5, 0.75, 0.9, 0.95)


@dataclass
class UnitCurve:
    """One target or group: its size and what pruning it alone to each level costs."""

    name: str
    kind: str  # "target" (a parameter) or "group" (coupled channels or heads)
    size: int  # parameters (target) or units (group)
    loss: list[float]
    accuracy: list[float]
    params_removed: list[int]
    macs_removed: list[int]
    members: list[str] = field(default_factory=list)


@dataclass
class SensitivityResult:
    pattern: str
    criterion: str
    levels: list[float]
    baseline_loss: float
    baseline_accuracy: float
    samples: int
    curves: list[UnitCurve]
    total_params: int = 0
    total_macs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityResult:
        curves = [UnitCurve(**c) for c in data["curves"]]
        return cls(**{**data, "curves": curves})

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RegrowError(f"sensitivity file {os.fspath(path)!r} is not readable ({exc}).") from None

    def loss_at(self, name: str, level: float) -> float:
        """Loss with ``name`` pruned alone to ``level`` (linear interpolation; level 0 is the baseline)."""
        curve = next(c for c in self.curves if c.name == name)
        xs = [0.0, *self.levels]
        ys = [self.baseline_loss, *curve.loss]
        return _interp(level, xs, ys)

    def costliest(self, levels: dict[str, float], k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` targets/groups whose pruning to the given levels raises the loss most, with the rise."""
        rises = [(c.name, self.loss_at(c.name, levels.get(c.name, 0.0)) - self.baseline_loss) for c in self.curves]
        return sorted((r for r in rises if levels.get(r[0], 0.0) > 0), key=lambda r: -r[1])[:k]

    def markdown(self) -> str:
        header = "| target / group | size | " + " | ".join(f"loss at {lv:g}" for lv in self.levels) + " |"
        lines = [header, "|" + "---|" * (len(self.levels) + 2)]
        for c in self.curves:
            lines.append(f"| `{c.name}` | {c.size} | " + " | ".join(f"{v:.4f}" for v in c.loss) + " |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        xs = [0.0, *self.levels]
        for c in self.curves:
            ax.plot(xs, [self.baseline_loss, *c.loss], marker="o", markersize=3, label=c.name)
        ax.set_xlabel("sparsity of this target / group alone" if self.pattern != "head" else "share of heads removed")
        ax.set_ylabel("calibration loss")
        ax.set_title(f"sensitivity ({self.pattern}, {self.criterion})")
        ax.grid(alpha=0.3)
        if len(self.curves) <= 16:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        try:
            return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        finally:
            plt.close(fig)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    # beyond the last level: extend the last segment's slope
    return ys[-1] + (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9) * (x - xs[-1])


def calibration_batches(data: Iterable[Any], batches: int, device: torch.device) -> list[Any]:
    """The first ``batches`` batches, on the model's device, reused for every measurement."""
    out = [(to_device(x, device), to_device(y, device)) for x, y in (unpack(b) for b in islice(data, batches))]
    if not out:
        raise RegrowError("sensitivity analysis needs at least one batch of calibration data.")
    return out


def sensitivity(
    model: nn.Module,
    data: Iterable[Any],
    *,
    pattern: str = "unstructured",
    levels: Sequence[float] = DEFAULT_LEVELS,
    criterion: str = "magnitude",
    targets: Any = None,
    ignore: Any = None,
    batches: int = 8,
    example_inputs: Any = None,
    progress: bool = True,
) -> SensitivityResult:
    """Prune each target (or coupled group) alone to each level and measure loss and accuracy.

    Args:
        data: (inputs, targets) batches; the first ``batches`` are the calibration subset.
        pattern: ``unstructured``, an n:m pattern (one level: its fixed sparsity), ``channel`` or ``head``.
        levels: sparsities to try (fractions of weights, channels or heads removed), each in (0, 1).
        criterion, targets, ignore: as for :func:`regrow.prune`.

    Returns:
        A :class:`SensitivityResult` (``.plot(path)``, ``.save(path)``, ``.markdown()``). The model is unchanged.
    """
    levels = sorted(float(v) for v in levels)
    if not levels or any(not 0.0 < v < 1.0 for v in levels):
        raise RegrowError(f"sensitivity levels must be numbers in (0, 1); got {list(levels)!r}.")
    device = model_device(model)
    calib = calibration_batches(data, batches, device)
    was_training = model.training
    model.eval()
    base = classification_metrics(model, calib)
    try:
        if pattern in ("channel", "head", "channel+head"):
            curves, totals = _structural_curves(
                model, calib, pattern, levels, criterion, targets, ignore, example_inputs, progress
            )
        else:
            curves, totals = _masked_curves(model, calib, pattern, levels, criterion, targets, ignore, progress)
    finally:
        model.train(was_training)
    return SensitivityResult(
        pattern,
        criterion,
        levels if pattern in ("channel", "head", "channel+head", "unstructured") else levels[:1],
        base["loss"],
        base["accuracy"],
        int(base["samples"]),
        curves,
        *totals,
    )


def _masked_curves(
    model: nn.Module,
    calib: list[Any],
    pattern: str,
    levels: list[float],
    criterion: str,
    targets: Any,
    ignore: Any,
    progress: bool,
) -> tuple[list[UnitCurve], tuple[int, int]]:
    from regrow.criteria import CRITERIA
    from regrow.patterns import get_pattern
    from regrow.prune import pattern_masks, plan

    pat = get_pattern(pattern)
    if pat.name != "unstructured":  # n:m: the pattern fixes the level
        levels[:] = [1 - pat.n / pat.m]  # type: ignore[attr-defined]
    spec = plan(model, levels[0], pattern=pattern, criterion=criterion, scope="layer", targets=targets, ignore=ignore)
    scores = CRITERIA.get(criterion)(model, spec.targets, calib)
    one = calib[0][0][:1] if isinstance(calib[0][0], torch.Tensor) else {k: v[:1] for k, v in calib[0][0].items()}
    total_macs = dense_macs(model, one) or 0
    curves = []
    for fqn in bar(spec.targets, "sensitivity", enabled=progress):
        param = model.get_parameter(fqn)
        original = param.detach().clone()
        losses, accs, removed = [], [], []
        for level in levels:
            mask = pattern_masks(model, pat, {fqn: scores[fqn]}, sparsity=level, threshold=None, scope="layer")[fqn]
            with torch.no_grad():
                param.mul_(mask)
            metrics = classification_metrics(model, calib)
            losses.append(metrics["loss"])
            accs.append(metrics["accuracy"])
            removed.append(int((~mask).sum()))
            with torch.no_grad():
                param.copy_(original)
        curves.append(UnitCurve(fqn, "target", param.numel(), losses, accs, removed, [0] * len(levels)))
    return curves, (count_params(model)[0], total_macs)


def _structural_curves(
    model: nn.Module,
    calib: list[Any],
    pattern: str,
    levels: list[float],
    criterion: str,
    targets: Any,
    ignore: Any,
    example_inputs: Any,
    progress: bool,
) -> tuple[list[UnitCurve], tuple[int, int]]:
    from regrow.structural import prepare
    from regrow.structural.batchnorm import recalibrate_batchnorm
    from regrow.structural.budget import take

    work = copy.deepcopy(model)
    prepared = prepare(
        work,
        pattern=pattern,
        criterion=criterion,
        targets=targets,
        ignore=ignore,
        data=calib,
        example_inputs=example_inputs if example_inputs is not None else calib[0][0],
    )
    one = prepared.one
    total_macs = dense_macs(work, one) or 0
    total_params = count_params(work)[0]
    curves = []
    for unit, scores in bar(list(zip(prepared.active, prepared.scores, strict=True)), "sensitivity", enabled=progress):
        losses, accs, p_removed, m_removed = [], [], [], []
        order = [int(i) for i in torch.sort(scores.scores, stable=True).indices]
        for level in levels:
            n = min(unit.group.units - 1, math.ceil(level * unit.group.units - 1e-9))
            trial = copy.deepcopy(work)
            prepared.apply(trial, {unit.name: sorted(take(scores, order, n, 1.0))})  # every part keeps a unit
            recalibrate_batchnorm(trial, calib)  # as pruning itself does (adaptive BN)
            metrics = classification_metrics(trial, calib)
            losses.append(metrics["loss"])
            accs.append(metrics["accuracy"])
            p_removed.append(total_params - count_params(trial)[0])
            m_removed.append(total_macs - (dense_macs(trial, one) or 0))
        curves.append(
            UnitCurve(
                unit.name, "group", unit.group.units, losses, accs, p_removed, m_removed, list(unit.group.members)
            )
        )
    return curves, (total_params, total_macs)
