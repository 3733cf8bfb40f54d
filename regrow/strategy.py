"""``strategy: auto``: choose the pruning and recovery strategy from measured facts, and say why.

Every rule is a small function of :class:`Facts` that returns a :class:`Decision`: the setting, the
reason in plain words, and the evidence it rests on (a paper, or a regrow benchmark under
``benchmarks/results/``). Settings the recipe states itself are never overridden; the report lists
them as "given".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SMALL_DATASET = 5000  # training samples below which recovery over-fits easily
GRADUAL_FROM = 0.8  # unstructured sparsity from which a gradual schedule is chosen...
GRADUAL_MIN_STEPS = 2000  # ...when recovery has at least this many optimizer steps to ramp over
SENSITIVITY_BELOW = 0.5  # structural budgets keeping at most this share use the sensitivity allocation
SHIFT_MIN_SIDE = 16  # images at least this many pixels on a side get 1-pixel shifts when distilling


@dataclass
class Facts:
    """What regrow measured about the model, the data and the request before choosing."""

    params: int
    macs: int | None
    layers: dict[str, int]
    train_samples: int
    image_inputs: bool
    budget: dict[str, float]
    image_side: int | None = None  # the shorter side of image inputs, in pixels
    teacher: bool = True
    seconds: float | None = None
    step_seconds: float | None = None
    steps_per_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    key: str  # recipe key, e.g. "prune.pattern"
    value: Any
    reason: str
    evidence: str = ""
    given: bool = False  # stated by the recipe, so kept

    def line(self) -> str:
        if self.given:
            return f"`{self.key}: {self.value}` — given by the recipe."
        tail = f" (evidence: {self.evidence})" if self.evidence else ""
        return f"`{self.key}: {self.value}` — {self.reason}{tail}"


@dataclass
class Strategy:
    facts: Facts
    decisions: list[Decision] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        return {d.key: d.value for d in self.decisions if not d.given}

    def to_dict(self) -> dict[str, Any]:
        return {"facts": self.facts.to_dict(), "decisions": [asdict(d) for d in self.decisions]}


def _budget(f: Facts) -> tuple[str, float]:
    return next(iter(f.budget.items()))


def rule_pattern(f: Facts) -> Decision:
    kind, value = _budget(f)
    if kind in ("macs", "latency"):
        return Decision(
            "prune.pattern",
            "channel",
            f"a {kind} budget is met only when layers really shrink; zeros inside dense layers keep "
            "their MACs and latency",
            "benchmarks/results/structural_speed.md: channels at half the MACs ran 2.16x faster (1.69x for the "
            "trained model); "
            "the digits demo at 90% unstructured sparsity ran no faster",
        )
    if kind == "params":
        return Decision("prune.pattern", "channel", "a parameter budget asks for a physically smaller model")
    return Decision(
        "prune.pattern",
        "unstructured",
        f"a sparsity budget ({value:g}) is about size: unstructured pruning keeps the most accuracy per weight removed",
        "Han et al. 2015; Blalock et al. 2020",
    )


def rule_criterion(f: Facts, pattern: str) -> Decision:
    if pattern in ("channel", "head", "channel+head"):
        return Decision(
            "prune.criterion",
            "magnitude",
            "the L2 norm of each coupled group needs no data and is a strong structural baseline",
            "Fang et al. 2023 (DepGraph); Li et al. 2017 (pruning filters by norm)",
        )
    return Decision(
        "prune.criterion",
        "magnitude",
        "magnitude needs no data and is hard to beat at a fixed budget",
        "Blalock et al. 2020, 'What is the state of neural network pruning?'",
    )


def rule_allocation(f: Facts, pattern: str) -> Decision:
    kind, value = _budget(f)
    structural = pattern in ("channel", "head", "channel+head")
    if structural and kind in ("macs", "params", "latency") and value <= SENSITIVITY_BELOW:
        return Decision(
            "prune.allocation",
            "sensitivity",
            f"keeping only {value:g} of the {kind} is aggressive: measured per-group sensitivity puts "
            "the cuts where they cost least",
            "benchmarks/results/allocation.md (sensitivity vs uniform at macs=0.35)",
        )
    if pattern in ("channel", "head", "channel+head"):
        return Decision(
            "prune.allocation",
            "global",
            f"a mild budget ({kind} {value:g}): one global ranking of normalised group scores is enough",
        )
    return Decision(
        "prune.allocation",
        "global",
        "one global magnitude ranking lets each layer keep what it needs",
        "Blalock et al. 2020",
    )


def rule_schedule(f: Facts, pattern: str, epochs: int) -> Decision:
    kind, value = _budget(f)
    steps = (f.steps_per_epoch or 0) * epochs
    if pattern == "unstructured" and kind == "sparsity" and value >= GRADUAL_FROM:
        if steps >= GRADUAL_MIN_STEPS:
            return Decision(
                "schedule.name",
                "gradual",
                f"target sparsity {value:g} is at least {GRADUAL_FROM:g} and recovery has {steps} steps to "
                "ramp over: raising the sparsity gradually loses less than pruning at once",
                "Zhu & Gupta 2017; benchmarks/results/recovery_methods.md (gradual with distillation best at 0.95 and "
                "0.98 with 34,400 steps) and unstructured.md (best at 0.98 with 17,200)",
            )
        return Decision(
            "schedule.name",
            "one_shot",
            f"target sparsity {value:g} would call for a gradual ramp, but recovery has only {steps} "
            f"optimizer steps (fewer than {GRADUAL_MIN_STEPS}): too few to ramp and then recover",
            "Zhu & Gupta 2017 ramp over thousands of steps; over a few hundred, the last masks get almost no "
            "training before recovery ends",
        )
    if pattern in ("channel", "head", "channel+head"):
        return Decision(
            "schedule.name",
            "one_shot",
            "structural pruning is applied once, then recovered with the whole budget (iterative rounds "
            "are never chosen automatically; set schedule.name: iterative to try them)",
        )
    return Decision("schedule.name", "one_shot", "a moderate sparsity: prune once, then recover with the whole budget")


def rule_method(f: Facts) -> Decision:
    if f.teacher:
        why = "a dense teacher is available"
        if f.train_samples < SMALL_DATASET:
            why += (
                f" and the training set has only {f.train_samples} samples: its soft targets carry more "
                "information per example than labels"
            )
        return Decision(
            "recover.method",
            "distill",
            why,
            "Hinton et al. 2015; benchmarks/results/recovery_methods.md (distill >= fine-tune)",
        )
    return Decision("recover.method", "finetune", "no dense teacher is available")


def rule_epochs(f: Facts, default_epochs: int) -> Decision:
    if f.seconds and f.step_seconds and f.steps_per_epoch:
        fits = int(f.seconds / (1.3 * f.step_seconds * f.steps_per_epoch))  # 1.3: validation and the teacher
        epochs = max(1, min(default_epochs, fits))
        return Decision(
            "recover.epochs",
            epochs,
            f"one epoch takes about {f.step_seconds * f.steps_per_epoch:.1f} s here; {epochs} fit in "
            f"the {f.seconds:g} s allowed",
        )
    return Decision("recover.epochs", default_epochs, "the default budget: equal compute with the default recipe")


def rule_regularization(f: Facts, method: str) -> list[Decision]:
    out = []
    if f.train_samples < SMALL_DATASET and method != "distill":
        out.append(
            Decision(
                "recover.label_smoothing",
                0.1,
                f"{f.train_samples} training samples over-fit easily and there is no teacher: smoothed "
                "targets resist it",
                "Müller, Kornblith & Hinton 2019",
            )
        )
    kind, value = _budget(f)
    high = kind == "sparsity" and value >= GRADUAL_FROM
    if high and method == "distill" and f.image_inputs and (f.image_side or 0) >= SHIFT_MIN_SIDE:
        out.append(
            Decision(
                "recover.augment",
                "shift",
                f"sparsity {value:g}, images of {f.image_side} pixels a side and a teacher: random 1-pixel shifts "
                "give the teacher new images to label every epoch, so the pruned model matches more of its "
                "function than the training set alone shows",
                "Beyer et al. 2022; benchmarks/results/recovery_methods.md: LeNet-300-100 on 28x28 "
                "Fashion-MNIST, gradual + distill with shifts 89.63 / 88.83 % at sparsity 0.95 / 0.98 against "
                "88.95 / 88.49 % without, better in each of 3 seeds; on the 8x8 digits shifts changed nothing "
                "(augment.md)",
            )
        )
        return out
    out.append(
        Decision(
            "recover.augment",
            "none",
            f"augmentation is chosen only for distillation at a sparsity of at least {GRADUAL_FROM:g} on images "
            f"of at least {SHIFT_MIN_SIDE} pixels a side; set recover.augment (shift, noise, hflip) to try it on "
            "your data",
            "benchmarks/results/augment.md: on the 8x8 digits demo random shifts left the mean recovered "
            "accuracy unchanged over 10 seeds",
        )
    )
    return out


def decide(facts: Facts, given: dict[str, Any], default_epochs: int = 10) -> Strategy:
    """Apply the rules; ``given`` maps recipe keys the user stated to their values (those are kept)."""
    strategy = Strategy(facts)

    def add(decision: Decision) -> Any:
        if decision.key in given:
            decision = Decision(decision.key, given[decision.key], "", given=True)
        strategy.decisions.append(decision)
        return decision.value

    pattern = add(rule_pattern(facts))
    add(rule_criterion(facts, pattern))
    if ":" not in str(pattern):  # an n:m pattern fixes every target's sparsity: there is nothing to allocate
        add(rule_allocation(facts, pattern))
    method = add(rule_method(facts))
    epochs = add(rule_epochs(facts, default_epochs))
    add(rule_schedule(facts, pattern, epochs))
    for d in rule_regularization(facts, method):
        add(d)
    return strategy
