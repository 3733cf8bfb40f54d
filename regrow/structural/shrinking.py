"""The steps of ``regrow.structural.shrink`` after ``prepare``: choose the units that meet the budget, remove
them under the equivalence check, recalibrate BatchNorm and report.

Like :mod:`regrow.structural.units`, the steps that compare outputs or time the model take ``compare`` and
``compare_latency`` from the package, where tests replace them.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

import torch
from torch import nn

from regrow.batches import forward, model_device
from regrow.errors import RegrowError, first_line
from regrow.measure.cost import count_params, dense_macs
from regrow.structural.arch import retie, tied_parameters
from regrow.structural.batchnorm import has_batchnorm, recalibrate_batchnorm
from regrow.structural.budget import TOLERANCE, SearchResult, Unitized, check_reachable, search
from regrow.structural.device import exact_arithmetic
from regrow.structural.heads import HeadGroup
from regrow.structural.options import has_channels
from regrow.structural.prepared import Prepared
from regrow.structural.report import StructureReport
from regrow.structural.rounding import AUTO_ROUND_TO, _round_step, _width_warnings, _widths, auto_round_to
from regrow.structural.simulate import Equivalence, simulate
from regrow.structural.undo import _Undo
from regrow.structural.units import Compare, _apply, _check, _Unit

log = logging.getLogger("regrow")
LATENCY_ROUNDS = 15  # interleaved forward passes per latency measurement of a budget candidate
LATENCY_TOLERANCE = 0.05

Removed = dict[str, list[int]]  # group name -> indices of the units removed from it
FINAL_CHECK_ROUNDS = 3  # removals chosen at most, each without the groups the last one's final check named


class _RemovalFailed(RegrowError):
    """A removal each group's probe allowed failed as a whole (a budget candidate, or the final removal under the
    check), with the model as it was before it; :func:`_remove_checked` names the groups at fault."""

    def __init__(self, what: str, removed: Removed) -> None:
        super().__init__(what)
        self.what, self.removed = what, removed


@dataclass(frozen=True)
class _Budget:
    """What the removal must achieve: ``target`` for ``kind`` (sparsity, macs, params or latency)."""

    kind: str
    target: float
    scope: str
    max_sparsity: float
    within: str | None = None  # macs and params are counted inside this submodule only

    @property
    def needs_nothing(self) -> bool:
        """Met by removing nothing: no sparsity, or all of the MACs, parameters or latency kept."""
        return (self.kind == "sparsity" and self.target == 0.0) or (self.kind != "sparsity" and self.target == 1.0)

    @property
    def tolerance(self) -> float:
        """Relative; wider for latency, whose measurements are noisy."""
        return LATENCY_TOLERANCE if self.kind == "latency" else TOLERANCE


@dataclass
class _Baseline:
    """The model before the removal: what budgets are measured against and narrowed widths compared to."""

    widths: dict[str, int]
    macs: int
    params: int
    units: int

    @classmethod
    def of(cls, model: nn.Module, one: Any, scored: list[Unitized], within: str | None = None) -> _Baseline:
        """Measure ``model`` on the one-sample batch ``one``; ``scored`` are the groups the budget works on; MACs
        and parameters inside ``within`` only, when given."""
        widths = _widths(model)
        macs = dense_macs(model, one, within) or 0
        params = _params(model, within)
        return cls(widths, macs, params, sum(g.units for g in scored))


def _params(model: nn.Module, within: str | None) -> int:
    return count_params(model.get_submodule(within) if within is not None else model)[0]


@dataclass
class _Choice:
    """The units chosen for removal, how many candidates were measured, and the rounding they follow."""

    removed: Removed
    evaluations: int
    round_to: int | None  # the multiple kept widths follow; None for heads
    auto: int  # the device's default multiple
    notes: list[str]  # why the budget or the default rounding was not met


def _apply_allocation(
    prepared: Prepared, allocation: dict[str, float] | None, scope: str
) -> tuple[list[Unitized], str]:
    """The scored groups with their share of the removal, and scope "allocation"; unchanged without one."""
    if allocation is None:
        return prepared.scores, scope
    unknown = sorted(set(allocation) - {u.name for u in prepared.units})
    if unknown:
        raise RegrowError(
            f"allocation names groups the model does not have: {unknown[:5]}; its groups are: "
            f"{', '.join(u.name for u in prepared.active)}."
        )
    scored = [replace(g, allocation=allocation.get(g.name, 0.0)) for g in prepared.scores]
    return scored, "allocation"


def _measure_for(
    model: nn.Module, prepared: Prepared, budget: _Budget, baseline: _Baseline, compare_latency: Callable[..., Any]
) -> Callable[[Removed], float]:
    """The budget's measure of a candidate removal: the fraction of units removed, or of MACs, parameters or
    latency kept. Candidates are shrunk and counted on the CPU copy; a latency candidate runs there once
    before it is timed on the model's device (a candidate that breaks must not break on the GPU)."""
    kind, active, host = budget.kind, prepared.active, prepared.host
    reference = copy.deepcopy(model) if kind == "latency" else None  # timed against each candidate
    if kind == "macs" and not baseline.macs:
        raise RegrowError("the MACs of this model could not be counted; use params= or sparsity= instead.")

    def measure(removed: Removed) -> float:
        if kind == "sparsity":
            return sum(len(v) for v in removed.values()) / baseline.units
        trial = copy.deepcopy(host)
        try:
            _apply(trial, active, removed)
        except RegrowError:
            raise
        except Exception as exc:  # noqa: BLE001 - a layer handler refused the removal; reported in one line
            raise _RemovalFailed(f"a shrunk candidate could not be built ({first_line(exc)})", removed) from None
        if kind == "macs":
            with warnings.catch_warnings(record=True) as counted:  # a candidate that does not run is handled here
                warnings.simplefilter("always")
                value = dense_macs(trial, prepared.host_one, budget.within)
            if value is None:
                _require_running(trial, prepared, removed)
                raise RegrowError(
                    f"MACs of a shrunk candidate could not be counted ({'; '.join(str(w.message) for w in counted)}): "
                    "the counter cannot follow one of its operations; use params= or sparsity= instead."
                )
            return value / baseline.macs
        if kind == "latency":
            _require_running(trial, prepared, removed)  # on the CPU copy first: a broken candidate is not timed
            if host is not model:
                trial = copy.deepcopy(model)
                _apply(trial, active, removed)
            before, after = compare_latency(reference, trial, prepared.inputs, rounds=LATENCY_ROUNDS)
            return after.median_ms / before.median_ms
        return _params(trial, budget.within) / baseline.params

    return measure


def _require_running(trial: nn.Module, prepared: Prepared, removed: Removed) -> None:
    """Raise :class:`_RemovalFailed` when the shrunk CPU candidate ``trial`` (``removed``) does not run."""
    try:
        with exact_arithmetic(), torch.no_grad():
            forward(trial, prepared.host_one)
    except Exception as exc:  # noqa: BLE001 - the user's forward on a shrunk copy; reported in one line
        raise _RemovalFailed(f"a shrunk candidate does not run ({first_line(exc)})", removed) from None


def _choose_removal(
    model: nn.Module,
    prepared: Prepared,
    scored: list[Unitized],
    budget: _Budget,
    baseline: _Baseline,
    round_to: int | None,
    round_widths: dict[str, int] | None,
    compare_latency: Callable[..., Any],
) -> _Choice:
    """Search the units to remove for the budget, relaxing the default rounding before missing it."""
    measure = _measure_for(model, prepared, budget, baseline, compare_latency)
    auto = auto_round_to(model_device(model))
    used_round = (round_to if round_to is not None else auto) if has_channels(prepared.pattern) else None
    if budget.needs_nothing:
        return _Choice({u.name: [] for u in prepared.active}, 0, used_round, auto, [])

    def search_for(groups: list[Unitized]) -> SearchResult:
        """The budget search over ``groups`` (the scored groups, or them with a finer rounding step)."""
        return search(
            groups,
            budget.target,
            measure,
            budget.scope,
            budget.max_sparsity,
            tolerance=budget.tolerance,
            decreasing=budget.kind != "sparsity",
        )

    notes: list[str] = []
    found = search_for(scored)
    evaluations = found.evaluations
    if not found.within_tolerance and round_to is None and has_channels(prepared.pattern):
        # The default rounding is a preference, the budget a requirement: finer multiples before a miss.
        retry, finer, spent = _finer_rounding(search_for, scored, prepared.active, auto, round_widths)
        evaluations += spent
        if retry is not None:
            notes.append(
                f"the default rounding (multiples of {auto}) could not meet the {budget.kind} budget "
                f"{budget.target:g} within {100 * budget.tolerance:g}%; kept widths are "
                + (f"multiples of {finer} instead." if finer > 1 else "not rounded instead.")
            )
            log.warning(notes[-1])
            found, used_round = retry, finer
    missed = check_reachable(found, budget.target, budget.kind, budget.max_sparsity, budget.tolerance)
    if missed:
        log.warning(missed)
        notes.append(missed)
    return _Choice(found.removed, evaluations, used_round, auto, notes)


def _finer_rounding(
    search_for: Callable[[list[Unitized]], SearchResult],
    scored: list[Unitized],
    active: list[_Unit],
    auto: int,
    round_widths: dict[str, int] | None,
) -> tuple[SearchResult | None, int, int]:
    """Search again with multiples finer than ``auto`` (8, then none) until one meets the budget.

    Returns the search that met it and its multiple ((None, auto) if none did), and the evaluations spent.
    """
    channel_groups = {u.name: u.group for u in active if not isinstance(u.group, HeadGroup)}
    evaluations = 0
    for finer in (m for m in (AUTO_ROUND_TO, 1) if m < auto):
        retry = search_for(
            [
                replace(g, step=_round_step(channel_groups[g.name], None, finer, round_widths))
                if g.name in channel_groups
                else g  # heads: one at a time already
                for g in scored
            ]
        )
        evaluations += retry.evaluations
        if retry.within_tolerance:
            return retry, finer, evaluations
    return None, auto, evaluations


def _culprits(model: nn.Module, units: list[_Unit], removed: Removed, inputs: Any, compare: Compare) -> list[str]:
    """The groups whose part of ``removed`` alone fails the check on ``model`` (as it was before the removal).

    A set of groups is checked together and split in halves only when it fails: a DenseNet-121 has 120 groups.
    """
    if not units:
        return []
    try:
        if _check(model, units, {u.name: removed[u.name] for u in units}, inputs, compare).passed:
            return []
    except Exception:  # noqa: BLE001 - a group whose shrinking breaks the forward pass is at fault as much
        pass
    if len(units) == 1:
        return [units[0].name]
    half = len(units) // 2
    return _culprits(model, units[:half], removed, inputs, compare) + _culprits(
        model, units[half:], removed, inputs, compare
    )


def _shrink_checked(
    model: nn.Module, prepared: Prepared, removed: Removed, compare: Compare
) -> tuple[Equivalence, nn.Module]:
    """Shrink ``model`` in place, held to the simulation of the removal on the untouched model.

    Simulation, shrinking and comparison run on the CPU copy in exact arithmetic (regrow.structural.device);
    a model on another device is shrunk after the check and must then hold the checked copy's weights.
    Returns the equivalence and the checked model (``model`` itself on the CPU). A mismatch, a forward pass that
    fails or a surgery a layer handler refuses (groups that each passed a probe of a few units) raises
    :class:`_RemovalFailed` with the shrunk model put back as it was before the surgery (:class:`_Undo`, which
    keeps references, where a copy kept for this rare path cost a whole model's memory: a 1.1B Llama of 4.18 GiB
    peaked at 16.6 GiB with it, 13.7 GiB without).
    """
    active, host, inputs = prepared.active, prepared.host, prepared.host_inputs
    cuts = [c for u in active for c in u.cuts(removed.get(u.name, []))]
    heads = [h for u in active for h in u.heads(removed.get(u.name, []))]
    ties = tied_parameters(model)
    with exact_arithmetic():
        simulated = simulate(host, cuts, heads)
        shrunk = model if host is model else copy.deepcopy(host)
        undo = _Undo(shrunk)  # the model before the surgery, for a failure's culprits: references, not a copy
        try:
            _apply(shrunk, active, removed)
        except RegrowError:
            undo.restore()
            raise
        except Exception as exc:  # noqa: BLE001 - a layer handler refused the removal (a sparsity budget builds none)
            undo.restore()
            raise _RemovalFailed(f"the shrunk model could not be built ({first_line(exc)})", removed) from None
        retie(shrunk, ties)  # the surgery gives every module its own new Parameter; tied ones share one again
        try:
            eq, broke = compare(shrunk, simulated, inputs), None
        except Exception as exc:  # noqa: BLE001 - groups that each passed a probe of a few units may not run together
            eq, broke = None, first_line(exc)
        if eq is None or not eq.passed:
            undo.restore()
            what = (
                f"the shrunk model's forward pass failed ({broke})"
                if eq is None
                else f"the shrunk model differs from its simulation by {eq.max_abs_diff:.3g}{eq.where} (tolerance "
                f"{eq.tolerance:.3g})"
            )
            raise _RemovalFailed(f"equivalence check failed: {what}", removed)
    if shrunk is not model:
        _apply(model, active, removed)
        retie(model, ties)
        _hold_to(model, shrunk)
    return eq, shrunk


@dataclass
class _Removal:
    """What :func:`_remove_checked` did: the choice (its notes say which groups it left out), the equivalence, the
    checked model, and ``prepared`` and ``baseline`` without the groups it left out."""

    choice: _Choice
    eq: Equivalence
    checked: nn.Module
    prepared: Prepared
    baseline: _Baseline


def _remove_checked(
    model: nn.Module,
    prepared: Prepared,
    scored: list[Unitized],
    budget: _Budget,
    baseline: _Baseline,
    options: tuple[int | None, dict[str, int] | None],
    compare: Compare,
    compare_latency: Callable[..., Any],
) -> _Removal:
    """Choose the removal and shrink ``model`` with it under the final check (:func:`_shrink_checked`).

    Every group passed a probe of a few units; a larger removal, a budget candidate or the one chosen, can still
    fail to build, to run or to match its simulation. The groups whose part of it fails alone are then left out,
    with the reason, and the removal is chosen again without them, ``FINAL_CHECK_ROUNDS`` times at most. A failure
    that no single group explains, or that leaves no group, is raised naming them. ``options`` are ``round_to``
    and ``round_widths``.
    """
    round_to, round_widths = options
    notes: list[str] = []
    for attempt in range(1, FINAL_CHECK_ROUNDS + 1):
        try:
            choice = _choose_removal(model, prepared, scored, budget, baseline, round_to, round_widths, compare_latency)
            eq, checked = _shrink_checked(model, prepared, choice.removed, compare)
            return _Removal(replace(choice, notes=notes + choice.notes), eq, checked, prepared, baseline)
        except _RemovalFailed as failed:
            gone = [u for u in prepared.active if failed.removed.get(u.name)]
            with exact_arithmetic():
                culprits = _culprits(prepared.host, gone, failed.removed, prepared.host_inputs, compare)
            if not culprits or attempt == FINAL_CHECK_ROUNDS or len(culprits) == len(scored):
                raise RegrowError(
                    " ".join(notes + [f"{failed.what}; group(s) at fault: "])
                    + f"{', '.join(culprits) or 'an interaction of groups'}. Leave them out with ignore=[...]."
                ) from None
            prepared, scored, baseline = _leave_out(prepared, scored, baseline, failed, culprits)
            notes.append(
                f"{failed.what}; group(s) {', '.join(culprits)} failed alone and were left out, and the removal was "
                "chosen again without them."
            )
            log.warning(notes[-1])
        except RegrowError as exc:
            raise RegrowError(" ".join([*notes, str(exc)])) from None  # with why groups it could have used are gone
    raise AssertionError("unreachable: the last round returns or raises")


def _leave_out(
    prepared: Prepared, scored: list[Unitized], baseline: _Baseline, failed: _RemovalFailed, culprits: list[str]
) -> tuple[Prepared, list[Unitized], _Baseline]:
    """``prepared``, ``scored`` and ``baseline`` without the groups ``culprits``, each left out with the reason."""
    for u in prepared.active:
        if u.name in culprits:
            u.group.excluded = (
                f"removing {len(failed.removed[u.name])} of its {u.group.units} units failed ({failed.what}), "
                "where a probe of a few had passed"
            )
    prepared = replace(
        prepared,
        active=[u for u in prepared.active if u.group.excluded is None],
        scores=[g for g in prepared.scores if g.name not in culprits],
    )
    scored = [g for g in scored if g.name not in culprits]
    return prepared, scored, replace(baseline, units=sum(g.units for g in scored))


VACUOUS_CHECK = (
    "so neither the check nor the per-group probes could tell a correct surgery from a wrong one; give the model its "
    "trained weights, or check the shrunk model on real data."
)


def _note_vacuous_check(eq: Equivalence, notes: list[str]) -> None:
    """Say so (log and report) when the final check compared outputs too small for it to tell a wrong surgery from
    a right one (:attr:`Equivalence.judges`): all exactly zero, none larger than its absolute tolerance, or so small
    that its tolerance is 1 % of them or more."""
    if eq.scale is None or eq.judges:
        return
    if eq.scale == 0.0:
        what = (
            "outputs that were all exactly zero (a classifier initialised to zero, as in torchvision's "
            "VisionTransformer, gives that)"
        )
    elif eq.scale <= eq.atol:
        what = (
            f"outputs no larger than its absolute tolerance (largest {eq.scale:.3g}, tolerance {eq.atol:g}; random "
            "initial weights whose activations vanish layer by layer, as Hugging Face's LeViT's do, give that)"
        )
    else:
        what = (
            f"outputs so small that its tolerance was {eq.tolerance / eq.scale:.0%} of the largest (largest "
            f"{eq.scale:.3g}, tolerance {eq.tolerance:.3g}; a classifier initialised small, as timm's EVA and BEiT "
            "scale theirs by 0.001, gives that)"
        )
    notes.append(f"the equivalence check compared {what}, {VACUOUS_CHECK}")
    log.warning(notes[-1])


def _hold_to(model: nn.Module, checked: nn.Module) -> None:
    """``model`` (on its device) has exactly the checked copy's parameters and buffers."""
    mine = dict(chain(model.named_parameters(), model.named_buffers()))
    theirs = dict(chain(checked.named_parameters(), checked.named_buffers()))
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        same = a is not None and b is not None and a.shape == b.shape
        if same and a.device.type != "meta":  # a meta tensor has a shape only
            same = torch.equal(a.detach().cpu(), b.detach())
        if not same:
            raise RegrowError(
                f"the model on {a.device if a is not None else '?'} was shrunk differently from the checked CPU copy "
                f"at {name!r}; this is a bug in regrow, please report it."
            )


def _recalibrate(
    model: nn.Module, data: Iterable[Any] | None, recalibrate: bool, units: list[_Unit], removed: Removed
) -> int:
    """Re-estimate BatchNorm statistics when asked, possible and needed; the number of batches used."""
    if recalibrate and data is not None and has_batchnorm(model) and any(removed.get(u.name) for u in units):
        return recalibrate_batchnorm(model, data)
    return 0


def _group_rows(units: list[_Unit], removed: Removed) -> list[dict[str, Any]]:
    """One row per group for the report: its members, units before and after, and why it was left out."""
    rows = []
    for u in units:
        gone = removed.get(u.name, [])
        rows.append(
            {
                "name": u.name,
                "kind": "heads" if isinstance(u.group, HeadGroup) else "channels",
                "members": u.group.members,
                "units_before": u.group.units,
                "units_after": u.group.units - len(gone),
                "unit_size": getattr(u.group, "unit_size", 1),
                "channels_before": getattr(u.group, "channels", u.group.units),
                "excluded": u.group.excluded,
            }
        )
    return rows


def _report(
    model: nn.Module,
    checked: nn.Module,
    prepared: Prepared,
    budget: _Budget,
    baseline: _Baseline,
    choice: _Choice,
    eq: Equivalence,
    recalibrated: int,
    round_to: int | None,
) -> StructureReport:
    """The report on the shrunk ``model`` (MACs counted on ``checked``, its CPU copy); its warnings are the
    choice's notes, then the width warnings."""
    group_rows = _group_rows(prepared.units, choice.removed)
    warnings_list = choice.notes + _width_warnings(model, round_to, prepared.pattern, baseline.widths, choice.auto)
    return StructureReport(
        pattern=prepared.pattern,
        criterion=prepared.criterion,
        scope=budget.scope,
        budget={budget.kind: budget.target},
        macs_before=baseline.macs,
        macs_after=dense_macs(checked, prepared.host_one, budget.within) or 0,
        params_before=baseline.params,
        params_after=_params(checked, budget.within),
        units_total=baseline.units,
        units_removed=sum(len(v) for v in choice.removed.values()),
        groups=group_rows,
        equivalence=eq,
        converted_attention=prepared.converted,
        standins=prepared.standins,
        evaluations=choice.evaluations,
        warnings=warnings_list,
        recalibrated_batches=recalibrated,
        round_to=choice.round_to,
        round_to_auto=has_channels(prepared.pattern) and round_to is None,
        within=budget.within,
    )
