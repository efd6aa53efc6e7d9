"""DoGE — Domain reweighting with Generalization Estimation (Fan, Pagliardini & Jaggi, ICML 2024).

Paper: one step of the (proxy) model on the mixture α moves θ by -η Σ_j α_j ∇ℓ_j. To first order the
target loss then falls by η Σ_j α_j ⟨∇ℓ_j, ∇ℓ_target⟩, so each domain's *generalization estimation*
score is

    W_j = ⟨∇ℓ_j(θ), ∇ℓ_target(θ)⟩                      (DoGE: W^(t), "OOD" target = evaluation data;
                                                         "universal" target = Σ_i ∇ℓ_i over domains)

and the domain weights take a mirror-descent (Bregman/KL) step, i.e. multiplicative weights:

    α_j^{t+1} ∝ α_j^t · exp(η · W_j^(t))               (η = model lr / μ in the paper)

Weights accumulate across rounds through α itself. The paper trains a proxy model with the weights and
then reports their average over training for a second, base-model run; online, we sample with the
current α and keep the running average in ``state_dict()["average"]`` for reference.

Our deviations, both options: the target can be the evaluation gradient (default, one extra
forward+backward on evaluation data per round) or the q-weighted sum of the domains' training
gradients (no extra pass); ``scale='max'`` (default) divides W by max|W_j| so that ``eta`` does not
depend on the parameter subset / sketch size the gradients live in (``scale='raw'`` is the paper's W).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.strategies._common import (
    alignment,
    check_range,
    multiplicative_update,
    option,
    reject_unknown,
    scaled,
    target_weights,
    weighted_alignment,
)
from rnb_ray.balance.strategies.base import RoundStats, Strategy
from rnb_ray.errors import RnbError


class DoGE(Strategy):
    name: ClassVar[str] = "doge"
    needs_train_grads: ClassVar[bool] = True
    needs_eval_grad: ClassVar[bool] = True  # False on instances built with target="train"

    OPTIONS: ClassVar[list[str]] = ["eta", "target", "scale"]

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        super().__init__(m, sizes=sizes, q=q, **options)
        opts = dict(options)
        self.eta = option(opts, "eta", 1.0, float, strategy=self.name)
        self.target = option(opts, "target", "eval", str, strategy=self.name)
        self.scale = option(opts, "scale", "max", str, strategy=self.name)
        reject_unknown(opts, strategy=self.name, known=self.OPTIONS)
        check_range("eta", self.eta, 0.0, np.inf, strategy=self.name)
        if self.target not in ("eval", "train"):
            raise RnbError(f"doge option target={self.target!r} is unknown", where="strategy_options",
                           fix="use target='eval' (evaluation gradient) or 'train' (universal)")
        if self.scale not in ("max", "raw"):
            raise RnbError(f"doge option scale={self.scale!r} is unknown", where="strategy_options",
                           fix="use scale='max' or 'raw'")
        # The universal target needs no evaluation pass: the instance flag overrides the class flag.
        self.needs_eval_grad = self.target == "eval"  # type: ignore[misc]
        self._sum = np.zeros(m)
        self._rounds = 0

    def scores(self, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        """W_j = <g_j, g_target> (scaled); 0 for domains absent from the round."""
        if self.target == "eval":
            w, reason = alignment(stats)
        else:  # the universal target Σ_i w_i g_i: its inner products come from G
            w, reason = weighted_alignment(stats, target_weights(self.q))
        return (scaled(w, self.scale), None) if reason is None else (w, reason)

    def update(self, p: np.ndarray, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        w, reason = self.scores(stats)
        if reason is None:
            p = multiplicative_update(p, w, self.eta)
        self._sum += p
        self._rounds += 1
        return p, reason

    def average(self) -> np.ndarray:
        """The paper's reported weights: the mean of α over the rounds so far."""
        return self._sum / self._rounds if self._rounds else self.initial()

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum.tolist(), "rounds": self._rounds, "average": self.average().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum = np.asarray(state["sum"], dtype=np.float64)
        self._rounds = int(state["rounds"])
