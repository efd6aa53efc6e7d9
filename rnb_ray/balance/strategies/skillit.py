"""Skill-It — online data selection over a skills graph (Chen et al., NeurIPS 2023, Algorithm 1).

Paper: with a skills graph A (A_ij ≥ 0: how much training on skill i lowers the loss of skill j), a
learning rate η and a window w, each round t observes the evaluation loss of every skill and sets

    p_i^t ∝ exp( η · Σ_{τ=t-w+1}^{t} Σ_j A_ij · L_eval,j(f_τ) )

so data flows to skills whose *dependents* still have high loss (and the start is p_i^1 ∝
exp(η Σ_j A_ij)). Evaluation losses per domain cost one forward pass over the evaluation data per round.

The paper estimates A before training by training on each skill separately and measuring the loss
change of every skill (m extra short runs). That offline step has no place in one online run, so the
``graph`` option offers:

* ``"gradient"`` (default) — the first-order version of that measurement, from the *training* gradients
  the run already captures: one small step on skill i changes the loss of skill j by -lr⟨∇ℓ_i, ∇ℓ_j⟩,
  so A_ij ∝ max(0, ⟨g_i, g_j⟩), each row normalised to sum 1 (so η does not scale with the number of
  domains), re-estimated every round (pairs involving a domain absent from the round keep their
  previous value; the start is the identity). No extra pass.
* ``"identity"`` — no transfer between skills (the paper's "no graph" ablation): p ∝ exp(η Σ_τ L(τ)).
* a matrix (nested list, or a .npy/.json path) — a graph you estimated yourself, used as given.

Evaluation skills are weighted by m·q_j (1 each when the evaluation set is balanced, the paper's sum).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from rnb_ray.balance.gram import softmax
from rnb_ray.balance.strategies._common import (
    check_range,
    load_matrix,
    option,
    reject_unknown,
    target_weights,
)
from rnb_ray.balance.strategies.base import RoundStats, Strategy
from rnb_ray.errors import RnbError


def gradient_graph(gram: np.ndarray, present: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Row-normalised first-order skills graph: A_ij = max(0, <g_i, g_j>) / Σ_k max(0, <g_i, g_k>).

    Computed over the domains present in the round (from the round's Gram matrix); rows and columns of absent
    domains keep ``previous``. Each row sums to 1 (where domain i helps anyone at all), so Σ_j A_ij L_j is a
    weighted *average* of losses and η keeps the same meaning whatever the number of domains.
    """
    present = np.asarray(present, dtype=bool)
    graph = previous.copy()
    if not present.any():
        return graph
    idx = np.flatnonzero(present)
    pos = np.maximum(np.asarray(gram, dtype=np.float64)[np.ix_(idx, idx)], 0.0)
    rows = pos.sum(axis=1, keepdims=True)
    block = np.where(rows > 0, pos / np.where(rows > 0, rows, 1.0), graph[np.ix_(idx, idx)])
    graph[np.ix_(idx, idx)] = block
    return graph


class SkillIt(Strategy):
    name: ClassVar[str] = "skillit"
    needs_train_grads: ClassVar[bool] = True  # False on instances with graph='identity' or a given graph
    needs_eval_losses: ClassVar[bool] = True

    OPTIONS: ClassVar[list[str]] = ["eta", "window", "graph"]

    def __init__(self, m: int, *, sizes: np.ndarray, q: np.ndarray, **options: Any):
        super().__init__(m, sizes=sizes, q=q, **options)
        opts = dict(options)
        self.eta = option(opts, "eta", 0.2, float, strategy=self.name)
        self.window = option(opts, "window", 3, int, strategy=self.name)
        graph = opts.pop("graph", "gradient")
        reject_unknown(opts, strategy=self.name, known=self.OPTIONS)
        check_range("eta", self.eta, 0.0, np.inf, strategy=self.name)
        check_range("window", self.window, 1, np.inf, strategy=self.name)
        self.graph_mode = graph if isinstance(graph, str) and graph in ("gradient", "identity") else "given"
        if self.graph_mode == "given":
            g = load_matrix(graph, name="graph", strategy=self.name, shape=(m, m))
            if np.any(g < 0):
                raise RnbError("skillit option graph has negative entries", where="strategy_options",
                               fix="give a skills graph with non-negative edge weights")
            self.graph = g
        else:
            self.graph = np.eye(m)
        self.needs_train_grads = self.graph_mode == "gradient"  # type: ignore[misc]
        self.history: list[list[float]] = []  # the last `window` evaluation-loss vectors

    def initial(self) -> np.ndarray:
        if self.graph_mode == "given":
            return softmax(self.eta * self.graph.sum(axis=1))  # p^1_i ∝ exp(η Σ_j A_ij)
        return np.full(self.m, 1.0 / self.m)

    def update(self, p: np.ndarray, stats: RoundStats) -> tuple[np.ndarray, str | None]:
        if self.graph_mode == "gradient" and stats.gram is not None:
            present = np.asarray(stats.counts) > 0
            if stats.present is not None:
                present &= np.asarray(stats.present, dtype=bool)
            self.graph = gradient_graph(stats.gram, present, self.graph)
        losses = stats.eval_losses
        if losses is None:
            return p, "no evaluation losses in this round"
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != (self.m,) or not np.any(np.isfinite(losses)):
            return p, "no finite evaluation loss in this round"
        # A domain without evaluation examples (NaN) is not an evaluation skill: it contributes nothing.
        losses = np.where(np.isfinite(losses), losses, 0.0)
        self.history = (self.history + [losses.tolist()])[-self.window :]
        summed = np.sum(np.asarray(self.history), axis=0) * target_weights(self.q)
        return softmax(self.eta * (self.graph @ summed)), None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "graph": self.graph.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [list(map(float, h)) for h in state["history"]]
        self.graph = np.asarray(state["graph"], dtype=np.float64)
