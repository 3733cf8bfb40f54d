"""Importance criteria: ``score(model, targets, data) -> {fqn: tensor}``; higher means more important.

Every criterion works with every pattern: patterns only see the scores. Register a new one with
``@CRITERIA.register("name")``.
"""

from __future__ import annotations

# Importing the modules registers their criteria.
from regrow.criteria import bn_scale as _bn_scale  # noqa: F401
from regrow.criteria import magnitude as _magnitude  # noqa: F401
from regrow.criteria import random as _random  # noqa: F401
from regrow.criteria import taylor as _taylor  # noqa: F401
from regrow.criteria.base import CRITERIA, Criterion

__all__ = ["CRITERIA", "Criterion"]
