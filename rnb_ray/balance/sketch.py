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
