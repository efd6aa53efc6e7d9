"""The strategies that never update p (pure numpy): ``stratified`` (uniform), ``natural`` (∝ domain size)
and ``static`` (weights given), plus ``check_weights``, the rule a given mixture must satisfy.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.strategies.base import Strategy


class Stratified(Strategy):
    """Uniform over domains, never updated (the paper's main baseline)."""

    name: ClassVar[str] = "stratified"

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        if options:
            raise ValueError(f"stratified takes no options, got {', '.join(sorted(options))}")
        super().__init__(m, sizes=sizes, q=q)


class Natural(Strategy):
    """Proportional to the number of training examples of each domain (sampling the corpus as is)."""

    name: ClassVar[str] = "natural"

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        if options:
            raise ValueError(f"natural takes no options, got {', '.join(sorted(options))}")
        super().__init__(m, sizes=sizes, q=q)
        if not self.sizes.sum() > 0:
            raise ValueError("natural needs at least one training example")

    def initial(self) -> np.ndarray:
        return self.sizes / self.sizes.sum()


class Static(Strategy):
    """Fixed weights (option ``weights``: m non-negative numbers summing to 1, in domain order)."""

    name: ClassVar[str] = "static"

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        opts = dict(options)
        weights = opts.pop("weights", None)
        if opts:
            raise ValueError(f"unknown option(s) for static: {', '.join(sorted(opts))} (static accepts weights)")
        super().__init__(m, sizes=sizes, q=q)
        if weights is None:
            raise ValueError("static needs weights")
        self.weights = check_weights(weights, m)

    def initial(self) -> np.ndarray:
        return self.weights.copy()


def check_weights(weights: Any, m: int, tol: float = 1e-6) -> np.ndarray:
    """m finite non-negative numbers summing to 1 (±tol); ValueError saying which rule failed."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (m,):
        raise ValueError(f"expected {m} weights, got {w.size}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite numbers")
    if np.any(w < 0):
        raise ValueError(f"weights must be non-negative (got {w.min():g})")
    if abs(w.sum() - 1.0) > tol:
        raise ValueError(f"weights must sum to 1 (±{tol:g}), they sum to {w.sum():.9g}")
    return w
