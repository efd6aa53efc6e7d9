"""Aioli — online estimation of the linear dynamic mixing law (Chen, Hu, Lourie, Cho & Ré, ICLR 2025).

Paper (Linear Mixing Optimization): over one round, the loss of group i moves as

    L_i^{t+1} = L_i^t - Σ_j A^t_ij p_j^t                       (linear dynamic mixing law)

and minimising Σ_i L_i^{t+1} over the simplex by exponentiated gradient gives

    p_j^t ∝ p_j^{t-1} · exp(η Σ_i A^t_ij).

Aioli learns A^t online (LearnParams, the paper's Algorithm 2): for each group j it trains briefly on a
smoothed one-hot mixture p^(j) (weight ``one_hot_factor`` on j, the rest spread evenly over the other
groups), measures the evaluation loss of every group before and after, and solves the m×m linear system
ΔL^(j) = -A p^(j) — repeated for ``sweeps`` sweeps in random order and solved jointly by least squares.
A^t is then normalised (by its largest |entry|) and optionally smoothed across rounds by an EMA
(A ← ema·A_prev + (1-ema)·A_new; ``ema`` = weight on the past).

How it maps onto rounds here. The strategy schedules its own phases: a *cycle* is
``m · sweeps`` learning rounds (one per perturbed mixture; the model keeps training on them, as in the
paper) followed by ``exploit_rounds`` rounds on the updated mixture p. The evaluation losses the loop
reports at the end of every round give the before/after losses, so each learning round costs exactly one
evaluation pass, like the paper's LearnParams. Round 0 trains on the uniform mixture and provides the
first "before" losses. The paper's learning sub-rounds are a few steps each (``lp_steps``), shorter than
an update round; ``learn_steps`` asks the loop for that length via ``next_round_steps()`` — a loop that
ignores it runs each learning round for the full ``update_every`` steps (the same estimate, more steps
spent on perturbed mixtures). Evaluation losses are weighted by m·q_i (1 each for a balanced evaluation
set, the paper's Σ_i).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.strategies._common import (
    check_range,
    multiplicative_update,
    option,
    reject_unknown,
    target_weights,
)
from rnb_ray.balance.strategies.base import RoundStats, Strategy
from rnb_ray.errors import RnbError


def perturbed_mixture(m: int, j: int, one_hot_factor: float) -> np.ndarray:
    """Weight ``one_hot_factor`` on group j, the rest evenly on the others (the paper's smoothed one-hot)."""
    if m == 1:
        return np.ones(1)
    p = np.full(m, (1.0 - one_hot_factor) / (m - 1))
    p[j] = one_hot_factor
    return p


def solve_mixing_law(mixtures: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """A with ΔL^(k) ≈ -A p^(k) for every observation k (least squares). Returns A (m×m), A_ij = effect of j on i.

    mixtures: (n, m) rows p^(k); deltas: (n, m) rows ΔL^(k) = L_after - L_before.
    Stacked: D = -P Aᵀ, so Aᵀ = -lstsq(P, D).
    """
    at, *_ = np.linalg.lstsq(np.asarray(mixtures, float), -np.asarray(deltas, float), rcond=None)
    return at.T


class Aioli(Strategy):
    name: ClassVar[str] = "aioli"
    needs_eval_losses: ClassVar[bool] = True

    OPTIONS: ClassVar[list[str]] = ["eta", "sweeps", "one_hot_factor", "ema", "exploit_rounds", "normalize",
                                    "learn_steps", "seed"]

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        super().__init__(m, sizes=sizes, q=q, **options)
        opts = dict(options)
        self.eta = option(opts, "eta", 0.2, float, strategy=self.name)
        self.sweeps = option(opts, "sweeps", 1, int, strategy=self.name)
        self.one_hot_factor = option(opts, "one_hot_factor", 0.625, float, strategy=self.name)
        self.ema = option(opts, "ema", None, float, strategy=self.name)
        self.exploit_rounds = option(opts, "exploit_rounds", 1, int, strategy=self.name)
        self.normalize = option(opts, "normalize", True, bool, strategy=self.name)
        self.learn_steps = option(opts, "learn_steps", None, int, strategy=self.name)
        self.seed = option(opts, "seed", 0, int, strategy=self.name)
        reject_unknown(opts, strategy=self.name, known=self.OPTIONS)
        check_range("eta", self.eta, 0.0, np.inf, strategy=self.name)
        check_range("sweeps", self.sweeps, 1, np.inf, strategy=self.name)
        check_range("exploit_rounds", self.exploit_rounds, 1, np.inf, strategy=self.name)
        check_range("one_hot_factor", self.one_hot_factor, 0.0, 1.0, strategy=self.name, lo_open=True)
        if m > 1 and abs(self.one_hot_factor - 1.0 / m) < 1e-9:
            raise RnbError(f"aioli option one_hot_factor={self.one_hot_factor} equals 1/m: every perturbed "
                           "mixture is uniform and the mixing law cannot be solved", where="strategy_options",
                           fix="use one_hot_factor well above 1/m, e.g. 0.625")
        if self.ema is not None:
            check_range("ema", self.ema, 0.0, 1.0, strategy=self.name, hi_open=True)
        if self.learn_steps is not None:
            check_range("learn_steps", self.learn_steps, 1, np.inf, strategy=self.name)
        self.base = self.initial()  # p^{t-1}: the mixture exploited between LearnParams phases
        self.phase = "exploit"  # role of the round now running: "exploit" or "learn"
        self.step = 0  # index within the phase (exploit round count, or learning-round index)
        self.cycle = 0
        self.before: list[float] | None = None  # evaluation losses at the start of the running round
        self.mixtures: list[list[float]] = []
        self.deltas: list[list[float]] = []
        self.A: np.ndarray | None = None

    # --- the learning schedule -------------------------------------------------------------------------
    def learn_order(self) -> list[int]:
        """Groups in the order LearnParams visits them: ``sweeps`` random permutations (seeded per cycle)."""
        order: list[int] = []
        for sweep in range(self.sweeps):
            rng = np.random.default_rng([self.seed, self.cycle, sweep])
            order.extend(int(j) for j in rng.permutation(self.m))
        return order

    def learn_mixture(self, k: int) -> np.ndarray:
        return perturbed_mixture(self.m, self.learn_order()[k], self.one_hot_factor)

    def next_round_steps(self) -> int | None:
        """Steps the next round should last, when it differs from ``update_every`` (learning sub-rounds)."""
        return self.learn_steps if self.phase == "learn" else None

    def estimate(self) -> np.ndarray:
        """A^t from this cycle's observations: solved, normalised, EMA-smoothed."""
        a = solve_mixing_law(np.asarray(self.mixtures), np.asarray(self.deltas))
        if self.normalize:
            top = float(np.max(np.abs(a)))
            if top > 0:
                a = a / top
        if self.ema is not None and self.A is not None:
            a = self.ema * self.A + (1.0 - self.ema) * a
        return a

    def _restart(self, reason: str) -> tuple[np.ndarray, str]:
        self.phase, self.step, self.before = "exploit", 0, None
        self.mixtures, self.deltas = [], []
        return self.base.copy(), reason

    def update(self, p: np.ndarray, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        losses = stats.eval_losses
        if losses is None:
            return self._restart("no evaluation losses in this round")
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != (self.m,) or not np.any(np.isfinite(losses)):
            return self._restart("no finite evaluation loss in this round")
        # A domain without evaluation examples (NaN) gives no loss change: its row of A stays 0 (its
        # evaluation weight m·q_i is 0 too, since q counts evaluation examples).
        losses = np.where(np.isfinite(losses), losses, np.nan)

        if self.phase == "learn":
            assert self.before is not None
            self.mixtures.append(np.asarray(p, dtype=np.float64).tolist())
            delta = losses - np.asarray(self.before, dtype=np.float64)
            self.deltas.append(np.where(np.isfinite(delta), delta, 0.0).tolist())
            self.before = losses.tolist()
            self.step += 1
            if self.step < self.m * self.sweeps:
                return self.learn_mixture(self.step), None
            # LearnParams done: A^t, then the exponentiated-gradient step on Σ_i w_i L_i.
            self.A = self.estimate()
            self.base = multiplicative_update(self.base, target_weights(self.q) @ self.A, self.eta)
            self.phase, self.step, self.mixtures, self.deltas = "exploit", 0, [], []
            self.cycle += 1
            return self.base.copy(), None

        # an exploit round just ended
        self.before = losses.tolist()
        self.step += 1
        if self.step < self.exploit_rounds:
            return self.base.copy(), None
        self.phase, self.step = "learn", 0
        return self.learn_mixture(0), None

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.tolist(),
            "phase": self.phase,
            "step": self.step,
            "cycle": self.cycle,
            "before": None if self.before is None else [x if np.isfinite(x) else None for x in self.before],
            "mixtures": self.mixtures,
            "deltas": self.deltas,
            "A": None if self.A is None else self.A.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = np.asarray(state["base"], dtype=np.float64)
        self.phase = str(state["phase"])
        self.step = int(state["step"])
        self.cycle = int(state["cycle"])
        before = state["before"]
        self.before = None if before is None else [float("nan") if x is None else float(x) for x in before]
        self.mixtures = [list(map(float, r)) for r in state["mixtures"]]
        self.deltas = [list(map(float, r)) for r in state["deltas"]]
        self.A = None if state["A"] is None else np.asarray(state["A"], dtype=np.float64)
