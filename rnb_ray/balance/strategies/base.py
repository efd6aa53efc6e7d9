"""The one interface every mixing strategy implements (pure: numpy only, no Ray, no IO).

A strategy owns the mixture p over m domains. Once per round (every ``update_every`` training steps) the
mixer actor hands it a ``RoundStats`` built from what the workers measured, and the strategy returns the
next p. Strategies declare which signals they need, so the training loop only spends extra compute
(evaluation passes) for the methods that need it, and accounts that cost in ``metrics.jsonl``:

* ``needs_train_grads`` — per-domain mean gradients of the captured parameter subset, taken from the
  ordinary backward pass (free; R&B, DoGE, DGA, Skill-It's default gradient graph).
* ``needs_eval_grad`` — the gradient of the evaluation loss on the same parameter subset (an extra
  forward+backward on evaluation data; DoGE, DGA).
* ``needs_eval_losses`` — the evaluation loss per domain (extra forward passes; Skill-It, Aioli).

The strategies are registered by name in ``rnb_ray.balance.strategies`` (``STRATEGIES``); ``build`` there
constructs one by name, and the mixer actor (``balance/mixer.py``) drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.gram import gram_terms_dense


@dataclass
class RoundStats:
    """What one round measured, over all workers. Gradient strategies see only inner products of the
    domains' mean gradients (formed on the workers, ``balance/gram_terms.py``), never the vectors."""

    round: int
    counts: np.ndarray  # (m,) training examples per domain in this round
    gram: np.ndarray | None = None  # (m, m) G_ij = ḡ_iᵀḡ_j over each domain's latest mean-gradient estimate
    present: np.ndarray | None = None  # (m,) bool: in this round with a finite gradient (its row of G is new)
    eval_align: np.ndarray | None = None  # (m,) ḡ_iᵀ g_eval (the evaluation-loss gradient, same subset/sketch)
    eval_sq: float | None = None  # g_evalᵀ g_eval (NaN when the evaluation gradient is not finite)
    eval_losses: np.ndarray | None = None  # (m,) evaluation loss per domain
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_vectors(cls, round_: int, counts: np.ndarray, grads: np.ndarray | None = None,
                     eval_grad: np.ndarray | None = None, eval_losses: np.ndarray | None = None,
                     previous: np.ndarray | None = None) -> RoundStats:
        """The stats from full vectors in one process (tests, notebooks): ``grads`` (m, D) this round's
        domain means with NaN rows for absent domains, ``previous`` the estimates before the round."""
        counts = np.asarray(counts)
        if grads is None:
            return cls(round_, counts, eval_losses=eval_losses)
        t = gram_terms_dense(grads, previous, eval_grad)
        return cls(round_, counts, gram=t["gram"], present=t["present"] & (counts > 0),
                   eval_align=t.get("eval_align"), eval_sq=t.get("eval_sq"), eval_losses=eval_losses,
                   extra={"est": t["est"]})


class Strategy:
    """Base class: subclasses set the ``needs_*`` flags and implement ``update``."""

    name: ClassVar[str] = "base"
    needs_train_grads: ClassVar[bool] = False
    needs_eval_grad: ClassVar[bool] = False
    needs_eval_losses: ClassVar[bool] = False

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        self.m = m
        self.sizes = np.asarray(sizes, dtype=np.float64)  # training examples per domain
        self.q = np.asarray(q, dtype=np.float64)  # evaluation proportions per domain
        self.options = options

    def initial(self) -> np.ndarray:
        """The mixture before the first round (uniform unless the method says otherwise)."""
        return np.full(self.m, 1.0 / self.m)

    def update(self, p: np.ndarray, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        """Return (next mixture, reason the update was skipped or None)."""
        return p, None

    def state_dict(self) -> dict[str, Any]:
        """Whatever the strategy carries across rounds (EMAs, accumulated scores); JSON-able."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

