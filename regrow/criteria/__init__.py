"""Importance criteria: ``score(model, targets, data) -> {fqn: tensor}``; higher means more important.

Every criterion works with every pattern: patterns only see the scores. Register a new one with
``@CRITERIA.register("name")``.

The calibrated criteria (``wanda``, ``sparsegpt``) also prune: their masks depend on the inputs each layer
sees once the layers before it are pruned, so :func:`regrow.prune` runs them layer by layer through their
``prune`` method (:mod:`regrow.criteria.calibration`); called as a plain criterion they score the model as it
is, from one set of forward passes.
"""

from __future__ import annotations

# Importing the modules registers their criteria.
from regrow.criteria import bn_scale as _bn_scale  # noqa: F401
from regrow.criteria import magnitude as _magnitude  # noqa: F401
from regrow.criteria import random as _random  # noqa: F401
from regrow.criteria import sparsegpt as _sparsegpt  # noqa: F401
from regrow.criteria import taylor as _taylor  # noqa: F401
from regrow.criteria import wanda as _wanda  # noqa: F401
from regrow.criteria.base import CRITERIA, Criterion, is_calibrated
from regrow.criteria.calibration import Calibration

__all__ = ["CRITERIA", "Calibration", "Criterion", "is_calibrated"]
