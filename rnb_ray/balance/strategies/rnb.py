"""R&B (the paper's Algorithm 1) as a strategy: p ← softmax(λ · Gq/‖Gq‖) each round (pure numpy).

The update itself is ``balance/gram.py``; this class keeps what carries across rounds: the latest estimate
of each domain's mean gradient (a domain absent from a round keeps its last one) and the last Gram matrix
(written to ``mixture.json``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.gram import gram, rnb_mixture
from rnb_ray.balance.strategies.base import RoundStats, Strategy


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
