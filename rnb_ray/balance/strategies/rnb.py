"""R&B (the paper's Algorithm 1) as a strategy: p ← softmax(λ · Gq/‖Gq‖) each round (pure numpy).

The update itself is ``balance/gram.py``. The latest estimate of each domain's mean gradient (a domain absent
from a round keeps its last one) lives on the workers, column-sharded (``balance/gram_terms.py``), which send
G over those estimates; this class keeps the last G (written to ``mixture.json``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.gram import rnb_mixture
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
        self.seen = np.zeros(m, dtype=bool)
        self.last_gram: np.ndarray | None = None

    def update(self, p: np.ndarray, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        """G arrives formed over each domain's latest estimate (absent domains keep theirs: the workers'
        ``DomainEstimates``)."""
        if stats.gram is None:
            return p, "no per-domain gradients in this round"
        counts = np.asarray(stats.counts)
        if not (counts > 0).any():
            return p, "no training examples in this round"
        present = np.asarray(stats.present, dtype=bool) if stats.present is not None else counts > 0
        bad = [int(i) for i in np.flatnonzero((counts > 0) & ~present)]
        if bad:
            return p, f"non-finite gradient for domain(s) {bad}"
        G = np.asarray(stats.gram, dtype=np.float64)
        new_p, reason = rnb_mixture(G, self.q, self.lam)
        if new_p is None:
            return p, reason
        self.seen |= present
        self.last_gram = G
        return new_p, None

    def state_dict(self) -> dict[str, Any]:
        # G as an array (the mixer saves it as a tensor): m × m floats as nested lists cost seconds at m = 1000
        return {"seen": self.seen.tolist(), "last_gram": self.last_gram}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = np.asarray(state.get("seen", [False] * self.m), dtype=bool)
        lg = state.get("last_gram")
        self.last_gram = None if lg is None else np.asarray(lg, dtype=np.float64)
