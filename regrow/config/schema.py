"""The recipe's schema: one typed section per concern, each value checked where it is declared.

Combinations of values that are each valid but do not work together are refused by
:mod:`regrow.config.checks`.
"""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from regrow.criteria.calibration import Calibration
from regrow.errors import RegrowError, one_of

_CAL = Calibration()  # the calibrated criteria's defaults


def _numeric_only(annotation: Any) -> bool:
    """A field typed int or float (optionally None), with no bool: ``true`` there is a mistake, not 1."""
    kinds = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    return bool(kinds & {int, float}) and bool not in kinds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and _numeric_only(field.annotation):
                    raise ValueError(f"'{name}' takes a number, not {str(data[name]).lower()}")
        return data


class ComponentConfig(_Strict):
    """A model or dataset: a built-in ``name`` or a ``factory`` given as ``"package.module:function"``."""

    name: str | None = Field(None, description="a built-in (see `regrow list`)")
    factory: str | None = Field(None, description="'package.module:function' returning the object")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for it")

    @model_validator(mode="after")
    def _one_source(self) -> ComponentConfig:
        if (self.name is None) == (self.factory is None):
            raise RegrowError("give exactly one of 'name' (a built-in) or 'factory' ('package.module:function').")
        if self.factory is not None and (self.factory.count(":") != 1 or not all(self.factory.split(":"))):
            raise RegrowError(f"factory {self.factory!r} must look like 'package.module:function'.")
        return self


class DataConfig(ComponentConfig):
    """The factory returns train / val / test loaders (see regrow.data.DataBundle)."""

    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of train carved out for validation when no val is given"
    )


class TrainConfig(_Strict):
    """Train the baseline before pruning (for built-in models that start untrained)."""

    epochs: int = Field(10, ge=1, description="epochs of baseline training")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate, cosine decay")
    weight_decay: float = Field(1e-4, ge=0)
    augment: str | None = Field(None, description="a built-in augmentation or 'package.module:function'")
    data: DataConfig | None = Field(
        None, description="train on this (source) dataset instead, then transfer to `data` with a new head"
    )


class ModelConfig(ComponentConfig):
    checkpoint: str | None = Field(None, description="safetensors file loaded into the model (never pickle)")
    train: TrainConfig | None = Field(None, description="train the model before pruning")


BUDGET_KEYS = ("sparsity", "threshold", "macs", "params", "latency")


class CalibrationConfig(_Strict):
    """Settings of the calibrated criteria (``regrow.criteria.Calibration``)."""

    batches: int = Field(_CAL.batches, ge=1, description="training batches read to calibrate each layer")
    dampening: float = Field(_CAL.dampening, gt=0, description="sparsegpt: added to the Hessian diagonal, x its mean")
    block_size: int = Field(
        _CAL.block_size, ge=1, description="sparsegpt: columns pruned together before the lazy update"
    )


class PruneConfig(_Strict):
    sparsity: float | None = Field(None, description="fraction of target weights zeroed, in [0, 1)")
    threshold: float | None = Field(None, description="zero every target weight whose score is below this")
    macs: float | None = Field(None, description="channel/head: fraction of MACs to keep, in (0, 1]")
    params: float | None = Field(None, description="channel/head: fraction of parameters to keep, in (0, 1]")
    latency: float | None = Field(None, description="channel/head: fraction of the measured latency to keep")
    within: str | None = Field(
        None, description="structural: a submodule whose parameters / MACs the budget counts; only it is pruned"
    )
    round_to: int | None = Field(
        None,
        ge=1,
        description="channel: round kept channel counts down to a multiple (default for groups of 32+ channels: 16 "
        "on AVX-512 CPUs, else 8); a group narrower than one multiple is not rounded",
    )
    max_sparsity: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="largest share removed from any target or group (default: 0.9 channel/head; 0.99 masked, and "
        "with scope global at most 1 - half the overall density)",
    )
    min_sparsity: float = Field(0.0, ge=0, lt=1, description="allocation: smallest share removed from any target")
    keep_dense: bool = Field(
        True,
        description="keep a frozen copy of the dense model: the distillation teacher, the embedding objective's "
        "reference and the dense side of the latency comparison; false saves one copy of the model's memory",
    )
    pattern: str | None = Field(
        None,
        description="unstructured, n:m (e.g. 2:4), channel or head; default: chosen by strategy auto, otherwise "
        "channel when a macs/params/latency budget is given and unstructured when not",
    )
    criterion: str = "magnitude"
    scope: Literal["global", "layer", "row"] = Field(
        "global",
        description="global: one ranking over all targets; layer: same sparsity per target; row: per output row "
        "(calibrated criteria never rank across layers: global means wanda's row, sparsegpt's layer)",
    )
    calibration: CalibrationConfig | None = Field(
        None, description="wanda / sparsegpt: calibration batches, sparsegpt's dampening and block size"
    )
    allocation: Literal["uniform", "global", "sensitivity", "search"] | None = Field(
        None, description="per-target sparsities for the budget; default: follows scope"
    )
    allocation_file: str | None = Field(
        None, description="an allocation.json from an earlier run, scaled to the budget"
    )
    clamps: dict[str, list[float]] | None = Field(None, description="allocation: {glob: [min, max]} per target")
    search_candidates: int = Field(16, ge=2, description="allocation search: candidates scored on calibration data")
    targets: list[str] | None = Field(
        None, description="fqns or globs; default: Linear/Conv weights but the final classifier"
    )
    ignore: list[str] | None = None

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        from regrow.criteria import CRITERIA

        if v not in CRITERIA:
            raise one_of("criterion", v, CRITERIA.names())
        return v

    @property
    def cap(self) -> float:
        """max_sparsity, or its default: 0.9 for groups of channels or heads, 0.99 for masked targets."""
        if self.max_sparsity is not None:
            return self.max_sparsity
        return 0.9 if self.resolved_pattern in ("channel", "head", "channel+head") else 0.99

    @property
    def resolved_pattern(self) -> str:
        return self.pattern or (
            "channel"
            if self.macs is not None or self.params is not None or self.latency is not None
            else "unstructured"
        )

    @model_validator(mode="after")
    def _budget(self) -> PruneConfig:
        from regrow.patterns import get_pattern

        pattern = get_pattern(self.resolved_pattern)
        if pattern.structural:
            from regrow.structural import check_structural_budget

            check_structural_budget(self.sparsity, self.macs, self.params, self.threshold, self.latency)
        elif self.macs is not None or self.params is not None or self.latency is not None:
            raise RegrowError(
                f"macs, params and latency budgets need pattern 'channel', 'head' or 'channel+head'; pattern "
                f"{self.pattern!r} keeps every dense shape. Give sparsity instead."
            )
        else:
            pattern.check({}, sparsity=self.sparsity, threshold=self.threshold)
        if self.allocation in ("uniform", "sensitivity", "search") and self.threshold is not None:
            raise RegrowError(
                f"allocation {self.allocation!r} plans per-target sparsities for a budget; give sparsity "
                "(or macs / params), not threshold."
            )
        if self.allocation is not None and not pattern.structural and pattern.name != "unstructured":
            raise RegrowError(f"pattern {pattern.name!r} fixes every target's sparsity; allocation does not apply.")
        for glob, bounds in (self.clamps or {}).items():
            if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] < 1.0:
                raise RegrowError(f"clamp {glob!r} must be [min, max] with 0 <= min <= max < 1; got {bounds!r}.")
        if self.min_sparsity > self.cap:
            raise RegrowError(f"min_sparsity ({self.min_sparsity}) is above max_sparsity ({self.cap}).")
        return self


class SensitivityConfig(_Strict):
    """Per-target sensitivity analysis on calibration batches (feeds allocation and the report)."""

    enabled: bool | None = Field(None, description="default: when an allocation needs it or the model is small")
    levels: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9, 0.95])

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        if not v or not all(0.0 < x < 1.0 for x in v):
            raise RegrowError(
                f"sensitivity levels must be a non-empty list of numbers in (0, 1), e.g. [0.5, 0.9]; got {v}"
            )
        return sorted(set(v))

    batches: int = Field(8, ge=1, description="calibration batches (from the validation split)")


class ScheduleConfig(_Strict):
    name: str = Field("one_shot", description="one_shot | iterative | gradual")
    rounds: int = Field(3, ge=1, description="iterative: rounds of prune -> recover")
    every: int = Field(10, ge=1, description="gradual: optimizer steps between mask updates")
    begin: float = Field(0.0, ge=0, le=1, description="gradual: ramp start, as a fraction of recovery steps")
    end: float = Field(0.6, ge=0, le=1, description="gradual: ramp end, as a fraction of recovery steps")
    initial: float = Field(0.0, ge=0, lt=1, description="gradual: sparsity at the start of the ramp")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from regrow.schedules import SCHEDULES

        if v not in SCHEDULES:
            raise one_of("schedule", v, SCHEDULES.names())
        return v

    @model_validator(mode="after")
    def _ramp(self) -> ScheduleConfig:
        if self.end < self.begin:
            raise RegrowError(f"schedule.end ({self.end}) must not be before schedule.begin ({self.begin}).")
        return self


class OriginalConfig(_Strict):
    """How the model was first trained (for rewinding and one-cycle): peak lr and schedule over epochs."""

    lr: float = Field(..., gt=0, description="peak learning rate of the original training")
    epochs: float = Field(..., gt=0, description="length of the original training in epochs")
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup: float = Field(0.0, ge=0, lt=1, description="fraction of the epochs spent warming up")
    milestones: list[float] = Field(default_factory=list, description="step: epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, description="step: factor at each milestone")

    def schedule_object(self) -> Any:
        from regrow.recovery.lr import OriginalSchedule

        return OriginalSchedule(self.lr, self.epochs, self.schedule, self.warmup, tuple(self.milestones), self.gamma)


class StopConfig(_Strict):
    """Target-driven stopping: end recovery early once the target is met or the time is up."""

    within: float | None = Field(
        None, ge=0, le=100, description="stop when validation accuracy is within this many points of the baseline's"
    )
    seconds: float | None = Field(None, gt=0, description="wall-time budget for recovery")

    @model_validator(mode="after")
    def _not_empty(self) -> StopConfig:
        if self.within is None and self.seconds is None:
            raise RegrowError(
                "recover.stop_when is empty: give within (points of the baseline) and/or seconds (a wall-time budget)."
            )
        return self


class DynamicConfig(_Strict):
    """Dynamic sparse training (rigl, set): drop and regrow a decaying share of weights every few steps."""

    update_every: int = Field(100, ge=1, description="optimizer steps between mask updates")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="initial share of active weights dropped per update")
    end: float = Field(0.75, gt=0, le=1, description="fraction of the steps after which masks stay fixed")


class ShareConfig(_Strict):
    """Weight sharing: each target's surviving weights take k shared values (k-means)."""

    k: int = Field(16, ge=2, le=65536, description="shared values per target (16 = 4-bit indices)")
    after: bool = Field(False, description="cluster and fine-tune after any recovery method")
    epochs: int = Field(2, ge=0, description="fine-tuning epochs of the shared values when used 'after'")


class GuardConfig(_Strict):
    """The divergence guard of every training regrow runs (baseline training, recovery, weight sharing); the
    rules are in :mod:`regrow.recovery.guard`."""

    explode_factor: float | None = Field(
        10.0,
        gt=1,
        description="a step loss above this many times the reference (the larger of the median of the last 20 "
        "accepted step losses and ln(classes)) diverged; null: only a non-finite loss does",
    )
    retries: int = Field(
        3, ge=0, le=20, description="rollbacks to the start of the epoch before the run stops; 0: stop at once"
    )
    lr_factor: float = Field(0.5, gt=0, lt=1, description="each rollback multiplies the learning rate by this")


class ObjectiveConfig(_Strict):
    """What recovery trains and the report measures (regrow.objectives)."""

    kind: Literal["labels", "embedding"] = Field(
        "labels", description="labels: cross-entropy, accuracy; embedding: distil an encoder's embedding, no labels"
    )
    output: str | None = Field(None, description="embedding: the output field (default: the model's first output)")
    pooling: Literal["mean", "first", "none"] = Field("mean", description="embedding: over the real tokens")
    loss: Literal["cosine", "mse"] = Field("cosine", description="embedding: 1 - cosine, or relative squared error")

    def build(self) -> Any:
        """The objective for :func:`regrow.recover` (None: labels, its default)."""
        if self.kind == "labels":
            return None
        from regrow.objectives import Embedding

        return Embedding(output=self.output, pooling=self.pooling, loss=self.loss)


class RecoverConfig(_Strict):
    """Options of :func:`regrow.recover` (the defaults are the documented defaults)."""

    method: str = Field("distill", description="finetune | distill | rigl | set | share | transfer")
    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    lr_schedule: str = Field("cosine", description="cosine (with warm-up) | constant | one_cycle")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of recovery steps spent warming up")
    patience: int | None = Field(5, ge=1, description="epochs without validation gain before stopping; null = never")
    alpha: float = Field(0.5, ge=0, le=1, description="distill: weight of the soft (teacher) loss")
    temperature: float = Field(2.0, gt=0, description="distill: softmax temperature")
    grad_clip: float | None = Field(None, gt=0)
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="decay of an exponential moving average of the weights, used for validation, the kept "
        "checkpoint and the result (e.g. 0.999; null = off)",
    )
    distill: bool | None = Field(
        None,
        description="add the distillation loss to finetune/rigl/set/share (default: only for method distill, "
        "where false turns it off; not for transfer)",
    )
    rewind: Literal["none", "lr", "weights"] = Field(
        "none", description="replay the original LR schedule (lr), and reset weights too (weights)"
    )
    rewind_epoch: float | None = Field(
        None, ge=0, description="where rewinding starts in the original training (default: its end minus recovery)"
    )
    rewind_checkpoint: str | None = Field(None, description="weights: safetensors file of the weights there")
    original: OriginalConfig | None = Field(
        None, description="the original training schedule (default: known for baselines regrow trained)"
    )
    max_lr: float | None = Field(None, gt=0, description="one_cycle: peak learning rate (default: the original peak)")
    stop_when: StopConfig | None = None
    dynamic: DynamicConfig = Field(default_factory=DynamicConfig)
    share: ShareConfig = Field(default_factory=ShareConfig)
    feature_weight: float = Field(0.1, ge=0, description="transfer: weight of the feature-distillation loss")
    augment: str | None = Field(
        None,
        description="a built-in augmentation (shift, noise, hflip) or 'package.module:function' "
        "mapping an input batch to an augmented one",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast precision of the training step (student and teacher) and of validation: fp32 | "
        "bf16 | fp16; weights, gradients and optimizer state stay float32, fp16 adds a gradient scaler",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="channels-last (NHWC) memory format for 4-D weights and inputs: true | false | auto (on for "
        "a convolutional model on a CUDA device: one with a Conv2d other than a ViT's patch embedding)",
    )
    compile: bool = Field(
        False, description="run the training forward through torch.compile (not with method transfer)"
    )
    guard: GuardConfig = Field(default_factory=GuardConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)

    @field_validator("channels_last", mode="before")
    @classmethod
    def _channels_last(cls, v: Any) -> Any:
        if v is True or v is False or v == "auto":
            return v
        raise one_of("channels_last", v, ["true", "false", "auto"])

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from regrow.recovery.methods import METHODS

        if v not in METHODS:
            raise one_of("recovery method", v, METHODS.names())
        return v

    @field_validator("lr_schedule")
    @classmethod
    def _lr_schedule(cls, v: str) -> str:
        from regrow.recovery.lr import LR_SCHEDULES

        allowed = [n for n in LR_SCHEDULES.names() if n != "rewind"]  # rewinding is asked for with recover.rewind
        if v not in allowed:
            raise one_of("lr_schedule", v, allowed)
        return v


class EvaluateConfig(_Strict):
    latency: bool = True
    latency_batch_size: int | None = Field(None, ge=1, description="default: the test loader's batch size")
    repeats: int = Field(20, ge=1)
    warmup: int = Field(5, ge=0)


class AccelerateConfig(_Strict):
    """2:4 weights packed for sparse tensor cores (regrow.accelerate) on a copy of the recovered model, on CUDA;
    the report states what was converted, what stayed dense and why, the speed-up and the accuracy measured."""

    enabled: bool = Field(False, description="pack the recovered 2:4 model's Linear weights (CUDA, pattern 2:4)")
    backend: Literal["auto", "cusparselt", "cutlass"] = Field(
        "auto", description="auto: cuSPARSELt when torch has it (the only one on Hopper), else CUTLASS on sm8x"
    )
    dtype: Literal["bf16", "fp16"] = Field("bf16", description="the copy is cast to this (the kernels need it)")
    cuda_graph: bool = Field(False, description="time with CUDA graphs (kernel time, no launch cost)")


class CheckpointConfig(_Strict):
    """Checkpoints of the run's training in its staging folder, for ``regrow run --resume`` after a crash
    (``regrow.recovery.checkpoint``); removed when the run is published."""

    enabled: bool = Field(True, description="save the whole training state at every epoch end")
    every_steps: int | None = Field(
        None, ge=1, description="also every this many optimizer steps within an epoch (null: at epoch ends only)"
    )


class RunConfig(_Strict):
    """A whole run: baseline -> prune -> recover -> report -> export."""

    name: str = "run"
    description: str = ""
    strategy: Literal["auto", "manual"] | None = Field(
        None,
        description="auto: choose pattern, allocation, schedule and recovery (default when only a budget is given)",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds every random stage (derived seeds add a few to it)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    model: ModelConfig
    data: DataConfig
    prune: PruneConfig
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    accelerate: AccelerateConfig = Field(default_factory=AccelerateConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError("'name' is used as a folder name (runs/<name>-<timestamp>): no '/', '\\' or '..'")
        return name

    def auto(self) -> bool:
        """Whether strategy auto applies: asked for, or implied by a recipe that states only a budget."""
        if self.strategy is not None:
            return self.strategy == "auto"
        only_budget = self.prune.model_fields_set <= set(BUDGET_KEYS)
        return only_budget and not ({"schedule", "recover"} & self.model_fields_set)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
