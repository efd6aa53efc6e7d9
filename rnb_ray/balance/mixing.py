"""R&B's mixture update and the simple strategies (pure numpy: no Ray, no IO).

The paper's Algorithm 1 (Ge et al. 2025, arXiv 2505.00358): with ḡ_i the mean gradient of domain i over
a round and q the evaluation proportions,

    G_ij = ḡ_iᵀ ḡ_j                       (Gram matrix, m × m)
    p    ← softmax(λ · G q / ‖G q‖)      (replaces p; nothing carried across rounds)

It is the closed form of a first-order loss decrease Σ_j q_j ḡ_jᵀ(Σ_i p_i ḡ_i) with an entropy regulariser
scaled by ‖Gq‖; λ is the inverse regularisation strength (the paper reports λ = 3).

Registered strategies: ``rnb``, ``stratified`` (uniform), ``natural`` (∝ domain size), ``static``
(weights given). Baselines (DGA, DoGE, Skill-It, Aioli) register from ``balance.baselines``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.strategy import STRATEGIES, RoundStats, Strategy, register


def known_strategies() -> list[str]:
    """Names of all registered strategies (imports the baselines package when present)."""
    try:
        import rnb_ray.balance.baselines  # noqa: F401  (registers DGA, DoGE, Skill-It, Aioli)
    except ModuleNotFoundError as e:
        if e.name != "rnb_ray.balance.baselines":
            raise
    return sorted(STRATEGIES)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def gram(grads: np.ndarray) -> np.ndarray:
    """G_ij = ḡ_iᵀ ḡ_j for the rows of ``grads`` (m × D) — accumulated in float64."""
    g = np.asarray(grads, dtype=np.float64)
    return g @ g.T


def rnb_mixture(G: np.ndarray, q: np.ndarray, lam: float) -> tuple[np.ndarray | None, str | None]:
    """p = softmax(λ · Gq / ‖Gq‖), or (None, reason) when the update is undefined."""
    G = np.asarray(G, dtype=np.float64)
    if not np.all(np.isfinite(G)):
        return None, "gram matrix is not finite"
    gq = G @ np.asarray(q, dtype=np.float64)
    norm = float(np.linalg.norm(gq))
    if not np.isfinite(norm) or norm == 0.0:
        # The paper hit this when evaluation and training domains do not overlap (q ⟂ G).
        return None, "‖Gq‖ is zero (evaluation and training gradients do not overlap)"
    return softmax(lam * gq / norm), None


def apply_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """Project p so every p_i >= floor, keeping the sum 1: clipped entries sit at the floor, the rest keep
    their ratios. Idempotent (a p already above the floor is unchanged); needs floor < 1/m."""
    p = np.asarray(p, dtype=np.float64)
    if floor <= 0.0:
        return p / p.sum()
    m = len(p)
    if floor * m >= 1.0:
        raise ValueError(f"floor {floor} is too large for {m} domains (needs floor < 1/m = {1 / m:.4g})")
    p = p / p.sum()
    clipped = np.zeros(m, dtype=bool)
    while True:
        free = ~clipped
        budget = 1.0 - floor * clipped.sum()
        out = np.where(clipped, floor, p * budget / p[free].sum())
        newly = free & (out < floor)
        if not newly.any():
            return out
        clipped |= newly


def domain_means(sums: np.ndarray, counts: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Per-domain mean gradients; rows of domains with no examples are NaN (the RoundStats convention).

    ``out=sums`` (a float64 array) divides in place: at m × |head| sizes a round's arrays are hundreds of
    MB, and every full copy costs more than the Gram matrix itself."""
    counts = np.asarray(counts, dtype=np.float64)
    if out is None:
        out = np.array(sums, dtype=np.float64)
    elif out is not sums:
        out[...] = sums
    for i, c in enumerate(counts):  # row by row: no (m, D) temporaries
        if c > 0:
            out[i] /= c
        else:
            out[i] = np.nan
    return out


@register
class RnB(Strategy):
    """R&B (the paper's Algorithm 1). Options: ``lam`` (λ, default 3)."""

    name: ClassVar[str] = "rnb"
    needs_train_grads: ClassVar[bool] = True

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        super().__init__(m, sizes=sizes, q=q, **options)
        opts = dict(options)
        self.lam = float(opts.pop("lam", 3.0))
        if opts:
            raise ValueError(f"unknown option(s) for rnb: {', '.join(sorted(opts))} (rnb accepts lam)")
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")
        self.last_grads: np.ndarray | None = None  # (m, D) the latest estimate of each domain's mean grad
        self.seen = np.zeros(m, dtype=bool)
        self.last_gram: np.ndarray | None = None

    def update(self, p: np.ndarray, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        """May fill ``stats.grads``' absent rows in place and keep it as the estimate (no (m, D) copy)."""
        if stats.grads is None:
            return p, "no per-domain gradients in this round"
        grads = np.asarray(stats.grads, dtype=np.float64)
        present = np.asarray(stats.counts) > 0
        if not present.any():
            return p, "no training examples in this round"
        # A row's sum is non-finite iff the row has a NaN/inf (or overflows, which is as unusable).
        bad = [int(i) for i in np.flatnonzero(present) if not np.isfinite(grads[i].sum())]
        if bad:
            return p, f"non-finite gradient for domain(s) {bad}"
        if self.last_grads is None or self.last_grads.shape != grads.shape:
            self.last_grads = np.zeros_like(grads)
        est = grads if grads.flags.writeable else grads.copy()  # asarray's own copies are writeable
        for i in np.flatnonzero(~present):  # a domain absent from this round keeps its last estimate
            est[i] = self.last_grads[i]
        G = gram(est)
        new_p, reason = rnb_mixture(G, self.q, self.lam)
        if new_p is None:
            return p, reason  # skipped rounds leave the estimates untouched too
        self.last_grads = est
        self.seen |= present
        self.last_gram = G
        return new_p, None

    def state_dict(self) -> dict[str, Any]:
        # The estimates are kept in float32: m × D numbers, the same size a round sends.
        grads = None if self.last_grads is None else self.last_grads.astype(np.float32)
        gram_ = None if self.last_gram is None else self.last_gram.tolist()
        return {"last_grads": grads, "seen": self.seen.tolist(), "last_gram": gram_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g = state.get("last_grads")
        self.last_grads = None if g is None else np.asarray(g, dtype=np.float64)
        self.seen = np.asarray(state.get("seen", [False] * self.m), dtype=bool)
        lg = state.get("last_gram")
        self.last_gram = None if lg is None else np.asarray(lg, dtype=np.float64)


@register
class Stratified(Strategy):
    """Uniform over domains, never updated (the paper's main baseline)."""

    name: ClassVar[str] = "stratified"

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        if options:
            raise ValueError(f"stratified takes no options, got {', '.join(sorted(options))}")
        super().__init__(m, sizes=sizes, q=q)


@register
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


@register
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
