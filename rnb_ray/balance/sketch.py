"""Random-projection sketches of per-domain linear-layer gradients (pure torch: no Ray, no IO).

For a linear layer s = aWᵀ (W: out × in) the gradient of a set of tokens is ΔᵀH (Δ: n × out output
gradients, H: n × in inputs). Its sketch is

    S(ΔᵀH) = R₁ᵀ (ΔᵀH) R₂ = (Δ R₁)ᵀ (H R₂)        (k₁ × k₂, never forming the out × in matrix)

with R₁ (out × k₁), R₂ (in × k₂) i.i.d. N(0, 1/k₁) and N(0, 1/k₂). As a map on vec(W) this is the
Kronecker projection (R₂ ⊗ R₁)ᵀ, and E[(R₂ ⊗ R₁)(R₂ ⊗ R₁)ᵀ] = I, so inner products — the Gram matrix
G_ij = ⟨g_i, g_j⟩ — are preserved in expectation (Johnson–Lindenstrauss); the error shrinks like
1/√(k₁k₂). Every worker builds the same R from the same seed, so sketches add across workers, and only
m × k numbers per layer leave a worker per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def sketch_shape(out_features: int, in_features: int, k: int) -> tuple[int, int]:
    """(k₁, k₂) with k₁·k₂ ≤ k, as square as the layer allows."""
    if k < 1:
        raise ValueError(f"sketch dimension must be >= 1, got {k}")
    k2 = max(1, min(in_features, math.isqrt(k)))
    k1 = max(1, min(out_features, k // k2))
    return k1, k2


@dataclass(frozen=True)
class LayerSketch:
    r_out: torch.Tensor  # (out, k1)
    r_in: torch.Tensor  # (in, k2)

    @property
    def dim(self) -> int:
        return self.r_out.shape[1] * self.r_in.shape[1]

    def to(self, device: torch.device | str) -> LayerSketch:
        return LayerSketch(self.r_out.to(device), self.r_in.to(device))


def make_layer_sketch(out_features: int, in_features: int, k: int, seed: int) -> LayerSketch:
    """The projections for one layer, identical on every worker for the same seed."""
    k1, k2 = sketch_shape(out_features, in_features, k)
    gen = torch.Generator().manual_seed(int(seed))
    r_out = torch.randn(out_features, k1, generator=gen) / math.sqrt(k1)
    r_in = torch.randn(in_features, k2, generator=gen) / math.sqrt(k2)
    return LayerSketch(r_out, r_in)


def sketch_tokens(delta: torch.Tensor, h: torch.Tensor, sk: LayerSketch) -> torch.Tensor:
    """S(ΔᵀH) = (ΔR₁)ᵀ(HR₂), flattened (k₁·k₂,). delta: (n, out), h: (n, in)."""
    return ((delta @ sk.r_out).T @ (h @ sk.r_in)).reshape(-1)


def sketch_matrix(grad: torch.Tensor, sk: LayerSketch) -> torch.Tensor:
    """S(W-gradient) for an already formed (out × in) gradient: R₁ᵀ g R₂, flattened."""
    return (sk.r_out.T @ grad @ sk.r_in).reshape(-1)


def sketch_flops(n_tokens: int, out_features: int, in_features: int, sk: LayerSketch) -> int:
    k1, k2 = sk.r_out.shape[1], sk.r_in.shape[1]
    return 2 * n_tokens * (out_features * k1 + in_features * k2 + k1 * k2)


def gram_relative_error(exact: np.ndarray, approx: np.ndarray) -> float:
    """‖G̃ − G‖_F / ‖G‖_F."""
    exact = np.asarray(exact, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(approx, dtype=np.float64) - exact) / np.linalg.norm(exact))


# Largest sketch the automatic choice picks: the projections cost 2·tokens·(out·k₁ + in·k₂) a step, which
# grows with √k (at a 30,522 × 768 head, k = 4096 is ≈ 0.5 % of a 124 M model's training FLOPs).
AUTO_MAX_SKETCH = 4096
AUTO_MIN_SKETCH = 256


@dataclass(frozen=True)
class CaptureChoice:
    """Exact or sketched capture, and why (recorded in ``result.json`` as ``capture``)."""

    sketch_dim: int  # 0: exact
    numbers_per_domain: int
    bytes_per_worker: int  # per-domain sums + this worker's share of the estimates, float32
    budget_bytes: int
    reason: str

    def as_dict(self) -> dict:
        return {"mode": "sketch" if self.sketch_dim else "exact", "sketch_dim": self.sketch_dim,
                "numbers_per_domain": self.numbers_per_domain, "bytes_per_worker": self.bytes_per_worker,
                "budget_mb": self.budget_bytes / 2**20, "reason": self.reason}


def choose_capture(shapes: list[tuple[int, int]], m: int, world: int, budget_bytes: int,
                   requested: int = -1) -> CaptureChoice:
    """Exact capture when the per-domain state fits the budget, else the largest power-of-two sketch that
    fits (at most ``AUTO_MAX_SKETCH``); ``requested`` ≥ 0 (``--sketch-dim``) overrides (0: exact).

    A worker holds the m × D sums it accumulates over a round and its 1/W of the m × D estimates (the
    reduce-scatter's output), both float32: 4·m·D·(1 + 1/W) bytes; the collectives move about that much too."""
    per = 1.0 + 1.0 / world

    def nbytes(d: int) -> int:
        return int(4 * m * d * per)

    exact = sum(o * i for o, i in shapes)
    if requested == 0:
        return CaptureChoice(0, exact, nbytes(exact), budget_bytes, "--sketch-dim 0: exact")
    if requested > 0:
        d = sum(sketch_shape(o, i, requested)[0] * sketch_shape(o, i, requested)[1] for o, i in shapes)
        return CaptureChoice(requested, d, nbytes(d), budget_bytes, f"--sketch-dim {requested}")
    if nbytes(exact) <= budget_bytes:
        return CaptureChoice(0, exact, nbytes(exact), budget_bytes,
                             f"exact sums ({nbytes(exact) / 2**20:.1f} MB) fit the budget")
    k = AUTO_MAX_SKETCH
    while k > AUTO_MIN_SKETCH and nbytes(k * len(shapes)) > budget_bytes:
        k //= 2
    d = sum(sketch_shape(o, i, k)[0] * sketch_shape(o, i, k)[1] for o, i in shapes)
    return CaptureChoice(k, d, nbytes(d), budget_bytes,
                         f"exact sums ({nbytes(exact) / 2**20:.0f} MB) exceed the budget: sketch {k}")
