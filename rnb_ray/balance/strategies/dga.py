"""DGA — Dynamic Gradient Alignment for online data mixing (Fan, Grangier & Ablin, 2024).

Paper: the mixture α is the outer variable of a bilevel problem min_α L_spe(θ*(α)); every T_r steps
(one round here) the outer gradient is estimated from the alignment of each domain's gradient with the
gradient of the specific (here: evaluation) loss at the current θ,

    ∇_{α_i} ≈ -⟨∇ℓ_i(θ_t), ∇L_spe(θ_t)⟩,

and α takes an exponentiated-gradient (mirror-descent) step on the simplex,

    α̂_{t+1} ∝ α_t ⊙ exp(-η ∇_α) = α_t ⊙ exp(η ⟨∇ℓ_i, ∇L_spe⟩),

stabilised by an exponential moving average of the weights:

    α_{t+1} = β α_t + (1 - β) α̂_{t+1}                  (β = ``ema``; 0 disables it)

Distribution reweighting (the paper's scalable variant for many fine-grained domains): α lives on N
*basis distributions* b_1..b_N over the m domains (rows of ``basis``), the sampling mixture is
p = Σ_j α_j b_j, and the outer gradient of α_j is the alignment of the basis gradient Σ_i b_ji ∇ℓ_i,
i.e. ⟨Σ_i b_ji ∇ℓ_i, ∇L_spe⟩ — computed here from the free per-domain gradients, so the extra cost is
still one evaluation gradient per round.

As for DoGE, ``scale='max'`` (default) divides the alignments by their largest magnitude so ``eta`` is
independent of the gradient subset / sketch; ``scale='raw'`` is the paper's unscaled step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.strategies._common import (
    alignment,
    check_range,
    load_matrix,
    multiplicative_update,
    option,
    reject_unknown,
    scaled,
)
from rnb_ray.balance.strategies.base import RoundStats, Strategy
from rnb_ray.errors import RnbError


class DGA(Strategy):
    name: ClassVar[str] = "dga"
    needs_train_grads: ClassVar[bool] = True
    needs_eval_grad: ClassVar[bool] = True

    OPTIONS: ClassVar[list[str]] = ["eta", "ema", "scale", "basis"]

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        super().__init__(m, sizes=sizes, q=q, **options)
        opts = dict(options)
        self.eta = option(opts, "eta", 1.0, float, strategy=self.name)
        self.ema = option(opts, "ema", 0.5, float, strategy=self.name)
        self.scale = option(opts, "scale", "max", str, strategy=self.name)
        basis = opts.pop("basis", None)
        reject_unknown(opts, strategy=self.name, known=self.OPTIONS)
        check_range("eta", self.eta, 0.0, np.inf, strategy=self.name)
        check_range("ema", self.ema, 0.0, 1.0, strategy=self.name, hi_open=True)
        if self.scale not in ("max", "raw"):
            raise RnbError(f"dga option scale={self.scale!r} is unknown", where="strategy_options",
                           fix="use scale='max' or 'raw'")
        if basis is None:
            self.basis = np.eye(m)
        else:
            b = load_matrix(basis, name="basis", strategy=self.name, shape=(None, m))
            if np.any(b < 0) or np.any(b.sum(axis=1) <= 0):
                raise RnbError("dga option basis must have non-negative rows with a positive sum",
                               where="strategy_options", fix="give each basis as a distribution over domains")
            self.basis = b / b.sum(axis=1, keepdims=True)
        self.alpha = np.full(self.basis.shape[0], 1.0 / self.basis.shape[0])

    def initial(self) -> np.ndarray:
        return self.basis.T @ self.alpha

    def outer_scores(self, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        """⟨Σ_i b_ji g_i, g_eval⟩ per basis j (scaled); identity basis = per-domain alignment."""
        w, reason = alignment(stats)
        if reason is not None:
            return w, reason
        return scaled(self.basis @ w, self.scale), None

    def update(self, p: np.ndarray, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        scores, reason = self.outer_scores(stats)
        if reason is not None:
            return self.basis.T @ self.alpha, reason
        proposal = multiplicative_update(self.alpha, scores, self.eta)
        self.alpha = self.ema * self.alpha + (1.0 - self.ema) * proposal
        return self.basis.T @ self.alpha, None

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
