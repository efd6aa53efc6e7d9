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


@dataclass
class RoundStats:
    """What one round measured, summed over all workers."""

    round: int
    counts: np.ndarray  # (m,) training examples per domain in this round
    grads: np.ndarray | None = None  # (m, D) domain-mean gradients (or sketches); rows with count 0 are NaN
    eval_grad: np.ndarray | None = None  # (D,) evaluation-loss gradient on the same subset/sketch
    eval_losses: np.ndarray | None = None  # (m,) evaluation loss per domain
    extra: dict[str, Any] = field(default_factory=dict)


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

