"""Every mixing strategy, by name (pure: numpy only, no Ray, no IO beyond reading a matrix option's file).

One module per method, all behind the ``Strategy`` interface of ``base.py``:

* ``rnb`` — R&B, the paper's Algorithm 1 (``rnb.py``; the update itself is ``balance/gram.py``);
* ``stratified``, ``natural``, ``static`` — the mixtures that never change (``simple.py``);
* ``dga``, ``doge``, ``skillit``, ``aioli`` — the paper's baselines (one module each; shared helpers in
  ``_common.py``).

Importing this package registers all of them in ``STRATEGIES``; ``build`` constructs one by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rnb_ray.balance.strategies.aioli import Aioli
from rnb_ray.balance.strategies.base import RoundStats, Strategy
from rnb_ray.balance.strategies.dga import DGA
from rnb_ray.balance.strategies.doge import DoGE
from rnb_ray.balance.strategies.rnb import RnB
from rnb_ray.balance.strategies.simple import Natural, Static, Stratified
from rnb_ray.balance.strategies.skillit import SkillIt
from rnb_ray.errors import RnbError

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RnB, Stratified, Natural, Static, Aioli, DGA, DoGE, SkillIt)
}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy class under its ``name`` (usable as a decorator for a strategy defined elsewhere)."""
    STRATEGIES[cls.name] = cls
    return cls


def known_strategies() -> list[str]:
    """Names of all registered strategies, sorted."""
    return sorted(STRATEGIES)


def build(name: str, m: int, *, sizes: Any, q: Any, options: dict[str, Any]) -> Strategy:
    """Construct strategy ``name`` for m domains; an unknown name or bad options become an RnbError."""
    if name not in STRATEGIES:
        raise RnbError(f"unknown strategy {name!r}", where="--strategy",
                       fix=f"use one of {', '.join(sorted(STRATEGIES))}")
    try:
        return STRATEGIES[name](m, sizes=np.asarray(sizes, dtype=np.float64), q=np.asarray(q, dtype=np.float64),
                                **options)
    except (ValueError, TypeError) as e:
        raise RnbError(f"bad options for strategy {name}: {e}", where="--strategy-options",
                       fix="check the option names and values in the strategy's documentation") from e


__all__ = ["DGA", "STRATEGIES", "Aioli", "DoGE", "Natural", "RnB", "RoundStats", "SkillIt", "Static", "Strategy",
           "Stratified", "build", "known_strategies", "register"]
