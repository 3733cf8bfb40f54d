"""The criterion contract and registry, below the modules that register into it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from torch import Tensor, nn

from regrow.registry import Registry


class Criterion(Protocol):
    def __call__(
        self, model: nn.Module, targets: list[str], data: Iterable[Any] | None = None
    ) -> Mapping[str, Tensor]: ...


CRITERIA: Registry[Callable[..., Mapping[str, Tensor]]] = Registry("criterion")


class LazyScores(Mapping[str, Tensor]):
    """Scores computed when read, one target at a time: ``scores[fqn]`` is ``elementwise(source(fqn))``.

    Global pruning reads every target's scores three times (``regrow.ranking``), a slice at a time
    (:meth:`chunks`), so a criterion that scores each weight on its own (magnitude: ``abs``) costs no copy of
    the model, not even of one target. A score read after the weights change is the new weights' score.
    """

    def __init__(
        self, targets: Iterable[str], source: Callable[[str], Tensor], elementwise: Callable[[Tensor], Tensor]
    ) -> None:
        self._targets = list(targets)
        self._known = set(self._targets)
        self._source = source
        self._elementwise = elementwise

    def __getitem__(self, fqn: str) -> Tensor:
        return self._elementwise(self.like(fqn))

    def like(self, fqn: str) -> Tensor:
        """A tensor of the scores' shape and device, not a copy (the source: e.g. the weight itself)."""
        if fqn not in self._known:
            raise KeyError(fqn)
        return self._source(fqn)

    def chunks(self, fqn: str, size: int) -> Iterator[Tensor]:
        """The flattened scores of ``fqn``, ``size`` at a time, each computed from its slice of the source."""
        flat = self.like(fqn).reshape(-1)
        for start in range(0, flat.numel(), size):
            yield self._elementwise(flat[start : start + size])

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def map(self, fn: Callable[[str, Tensor], Tensor]) -> LazyScores:
        """Scores ``fn(fqn, self[fqn])``, computed when read as these are (a target at a time, not in slices)."""
        return LazyScores(self._targets, lambda fqn: fn(fqn, self[fqn]), _same)


def _same(x: Tensor) -> Tensor:
    return x


def score_chunks(scores: Mapping[str, Tensor], fqn: str, size: int) -> Iterator[Tensor]:
    """``scores[fqn]`` flattened, ``size`` elements at a time (computed slice by slice where the scores can be)."""
    if isinstance(scores, LazyScores):
        yield from scores.chunks(fqn, size)
        return
    flat = scores[fqn].reshape(-1)
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]


def score_like(scores: Mapping[str, Tensor], fqn: str) -> Tensor:
    """A tensor of ``scores[fqn]``'s shape and device, without computing lazy scores."""
    return scores.like(fqn) if isinstance(scores, LazyScores) else scores[fqn]


def lazy_map(scores: Mapping[str, Tensor], fn: Callable[[str, Tensor], Tensor]) -> Mapping[str, Tensor]:
    """``fn`` applied to every score: when read for lazy scores, at once (as a dict) for any other mapping."""
    if isinstance(scores, LazyScores):
        return scores.map(fn)
    return {f: fn(f, s) for f, s in scores.items()}


def is_calibrated(name: str) -> bool:
    """Whether criterion ``name`` prunes layer by layer from calibration inputs (``wanda``, ``sparsegpt``)."""
    return name in CRITERIA and bool(getattr(CRITERIA.get(name), "calibrated", False))
