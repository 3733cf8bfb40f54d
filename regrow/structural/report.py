"""The result of a structural prune, as a plain data type.

Kept apart from the surgery so that lower layers (``regrow.masks`` carries one) can name the type without
importing the code that shrinks models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regrow.structural.simulate import Equivalence


@dataclass
class StructureReport:
    """What a structural prune removed, what it achieved, and the equivalence check's result."""

    pattern: str
    criterion: str
    scope: str
    budget: dict[str, float]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    units_total: int
    units_removed: int
    groups: list[dict[str, Any]]
    equivalence: Equivalence
    converted_attention: list[str] = field(default_factory=list)
    standins: list[str] = field(default_factory=list)  # torchvision / timm modules swapped for regrow's stand-ins
    evaluations: int = 0
    warnings: list[str] = field(default_factory=list)
    recalibrated_batches: int = 0
    round_to: int | None = None  # channel pattern: the multiple kept widths were rounded to
    round_to_auto: bool = False  # the device default, applied to groups of ROUND_MIN_CHANNELS channels or more
    within: str | None = None  # the submodule whose MACs and parameters the budget and the *_before/_after count

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["equivalence"] = self.equivalence.to_dict()
        out["macs_ratio"] = self.macs_ratio
        out["params_ratio"] = self.params_ratio
        return out
