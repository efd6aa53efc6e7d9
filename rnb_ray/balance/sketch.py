"""Sketches of per-domain linear-layer gradients (pure torch: no Ray, no IO).

Two kinds, both linear maps of vec(W) that preserve inner products in expectation, so sums of sketches are
sketches of sums (they add across steps and workers) and G_ij = ⟨g_i, g_j⟩ is estimated without bias.

**Row hash** (``kind="rowhash"``, the default): a count sketch of the weight's *rows* (for an LM head: the
vocabulary) into b buckets with random signs, the input side kept exact,

    S(ΔᵀH) = (Δ Cᵀ)ᵀ H,   C (b × out): C[h(v), v] = s(v) ∈ {±1}      (b × in numbers)

Hashing Δ costs one pass over it (an ``index_add`` into 2b columns: the signs are folded into the bucket
index), and the rest is a b × n × in GEMM — no projection of the big side. Heavy rows (the tokens that
occur as targets carry most of a head's gradient) are kept whole, only colliding with others, which is why
it tracks exact capture far better than a Gaussian sketch of the same size (``benchmarks/balance_overhead.py``:
mixture L1 ≈ 0.002–0.011 vs 0.02–0.08). Var(⟨Sx, Sy⟩) ≤ (‖x‖²‖y‖² + ⟨x, y⟩²)/b.

**Gaussian** (``kind="gaussian"``): for a linear layer s = aWᵀ (W: out × in) the gradient of a set of tokens is ΔᵀH (Δ: n × out output
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

SKETCH_KINDS = ("rowhash", "gaussian")


@dataclass(frozen=True)
class RowHash:
    """A count sketch of a layer's rows with some rows kept exact. The first ``exact`` buckets hold given rows
    whole (for an LM head: the most frequent tokens, which carry most of its gradient), the other ``hashed``
    buckets take every other row v at bucket h(v) with sign s(v). ``index`` maps each row to its column of one
    ``index_add`` over ``exact + 2·hashed`` columns (the sign folded in: the negative rows land ``hashed``
    columns further on)."""

    index: torch.Tensor  # (out,) int64 in [0, exact + 2·hashed)
    exact: int
    hashed: int
    in_features: int

    @property
    def buckets(self) -> int:
        return self.exact + self.hashed

    @property
    def dim(self) -> int:
        return self.buckets * self.in_features

    def to(self, device: torch.device | str) -> RowHash:
        return RowHash(self.index.to(device), self.exact, self.hashed, self.in_features)


def make_row_hash(out_features: int, in_features: int, buckets: int, seed: int,
                  exact_rows: torch.Tensor | None = None) -> RowHash:
    """The sketch for one layer, identical on every worker for the same seed and ``exact_rows`` (kept in
    ascending order; fewer than ``buckets`` of them, so at least one bucket is left for the other rows)."""
    if not 1 <= buckets <= out_features:
        raise ValueError(f"a row-hash sketch needs 1 <= buckets <= {out_features} (the layer's rows), got {buckets}")
    rows = torch.zeros(0, dtype=torch.long) if exact_rows is None else torch.as_tensor(exact_rows).long().unique()
    if rows.numel() >= buckets or (rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= out_features)):
        raise ValueError(f"exact rows must be fewer than the {buckets} buckets and lie in [0, {out_features}); got "
                         f"{rows.numel()} in [{int(rows.min()) if rows.numel() else 0}, "
                         f"{int(rows.max()) if rows.numel() else 0}]")
    r = rows.numel()
    b = buckets - r
    gen = torch.Generator().manual_seed(int(seed))
    bucket = torch.randint(0, b, (out_features,), generator=gen)
    negative = torch.randint(0, 2, (out_features,), generator=gen)
    index = r + bucket + b * negative
    index[rows] = torch.arange(r)
    return RowHash(index, r, b, in_features)


def hash_rows(delta: torch.Tensor, rh: RowHash) -> torch.Tensor:
    """Δ Cᵀ: (n, out) → (n, buckets): the exact rows' columns, then each other row added into its bucket with
    its sign."""
    r, b = rh.exact, rh.hashed
    cols = torch.zeros(delta.shape[0], r + 2 * b, dtype=delta.dtype, device=delta.device)
    cols.index_add_(1, rh.index, delta)
    return torch.cat([cols[:, :r], cols[:, r:r + b] - cols[:, r + b:]], dim=1)


def frequent_rows(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows with the largest counts (ties: lower row first), only rows counted at least once."""
    counts = torch.as_tensor(counts).double().cpu()
    order = torch.argsort(-counts, stable=True)[:k]
    return order[counts[order] > 0].sort().values


def row_hash_matrix(grad: torch.Tensor, rh: RowHash) -> torch.Tensor:
    """S of an already formed (out × in) gradient: C g, flattened (b·in,)."""
    return hash_rows(grad.T, rh).T.reshape(-1)


def row_hash_flops(n_tokens: int, out_features: int, rh: RowHash, hashed_rows: int | None = None) -> int:
    """Hashing ``hashed_rows`` rows of Δ (default: the tokens) plus the buckets × n × in GEMM over ``n_tokens``."""
    return (n_tokens if hashed_rows is None else hashed_rows) * out_features + 2 * n_tokens * rh.buckets * rh.in_features


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


# The automatic choice. Gaussian: the projections cost 2·tokens·(out·k₁ + in·k₂) a step, which grows with √k
# (at a 30,522 × 768 head, k = 4096 is ≈ 0.5 % of a 124 M model's training FLOPs). Row hash: one pass over Δ
# plus 2·tokens·b·in a step (b = 1024 at a 768-wide head: ≈ 0.2 % of a 124 M model's step).
AUTO_MAX_SKETCH = 4096
AUTO_MIN_SKETCH = 256
AUTO_MAX_BUCKETS = 1024
AUTO_MIN_BUCKETS = 64


def layer_dims(shapes: list[tuple[int, int]], kind: str, size: int) -> list[int]:
    """Numbers per domain of each layer's sketch: Gaussian ``size`` = k₁·k₂ per layer; row hash ``size`` = buckets
    (min(b, out) · in)."""
    if kind == "rowhash":
        return [min(size, o) * i for o, i in shapes]
    return [sketch_shape(o, i, size)[0] * sketch_shape(o, i, size)[1] for o, i in shapes]


def effective_dims(shapes: list[tuple[int, int]], kind: str, size: int, exact_rows: list[int] | None = None
                   ) -> list[float]:
    """Per layer, the k of the error estimate (``gram.expected_sketch_error``): a row hash's is its count of
    hashed buckets (the input side and the exact rows are exact; a layer with buckets ≥ out is kept exact: inf),
    a Kronecker Gaussian's is 1/(1/k₁ + 1/k₂ + 1/(k₁k₂)) (no better than its worse side on low-rank gradients)."""
    if kind == "rowhash":
        ex = exact_rows or [0] * len(shapes)
        return [float(size - r) if size < o else float("inf") for (o, _), r in zip(shapes, ex, strict=True)]
    out = []
    for o, i in shapes:
        k1, k2 = sketch_shape(o, i, size)
        out.append(1.0 / (1.0 / k1 + 1.0 / k2 + 1.0 / (k1 * k2)))
    return out


@dataclass(frozen=True)
class CaptureChoice:
    """Exact or sketched capture, and why (recorded in ``result.json`` as ``capture``)."""

    sketch_dim: int  # 0: exact; else the sketch size (row hash: buckets; Gaussian: k₁·k₂ per layer)
    numbers_per_domain: int
    bytes_per_worker: int  # per-domain sums + this worker's share of the estimates (+ the collective's buffer), float32
    budget_bytes: int
    reason: str
    kind: str = "rowhash"
    slots: int | None = None  # rows of the sums a round fills (None: one per domain)

    def as_dict(self) -> dict:
        return {"mode": "sketch" if self.sketch_dim else "exact", "kind": self.kind if self.sketch_dim else None,
                "sketch_dim": self.sketch_dim, "numbers_per_domain": self.numbers_per_domain,
                "bytes_per_worker": self.bytes_per_worker, "budget_mb": self.budget_bytes / 2**20,
                "sum_rows": self.slots, "reason": self.reason}


def choose_capture(shapes: list[tuple[int, int]], m: int, world: int, budget_bytes: int,
                   requested: int = -1, kind: str = "rowhash", slots: int | None = None) -> CaptureChoice:
    """Exact capture when the per-domain state fits the budget, else the largest power-of-two sketch of
    ``kind`` that fits (row hash: ≤ ``AUTO_MAX_BUCKETS`` buckets; Gaussian: ≤ ``AUTO_MAX_SKETCH`` numbers a
    layer; never below the minimum, even over budget); ``requested`` ≥ 0 (``--sketch-dim``) overrides (0: exact).

    A worker holds the sums it accumulates over a round — S × D with ``slots`` = S (the rows a round may fill: a
    slotted ``DomainGradCapture``), else m × D — and its 1/W of the m × D estimates (the reduce-scatter's
    output), all float32, and with several workers the buffer the round's collective fills, kept across rounds
    (the rows of the domains some worker saw, at most min(m, W·S)): 4·D·(S + m/W) bytes with one worker,
    4·D·(S + m/W + min(m, W·S)) with more (without slots: 4·m·D·(2 + 1/W)). The collectives move at most
    4·D·min(m, W·S) a round (only the seen rows travel)."""
    if kind not in SKETCH_KINDS:
        raise ValueError(f"unknown sketch kind {kind!r}: choose from {', '.join(SKETCH_KINDS)}")
    rows = m if slots is None else min(m, max(1, int(slots)))
    sum_rows = None if slots is None else rows
    per = rows + m / world + (min(m, world * rows) if world > 1 else 0)

    def nbytes(d: int) -> int:
        return int(4 * d * per)

    exact = sum(o * i for o, i in shapes)
    if requested == 0:
        return CaptureChoice(0, exact, nbytes(exact), budget_bytes, "--sketch-dim 0: exact", kind, sum_rows)
    if requested > 0:
        d = sum(layer_dims(shapes, kind, requested))
        return CaptureChoice(requested, d, nbytes(d), budget_bytes, f"--sketch-dim {requested} ({kind})", kind, sum_rows)
    if nbytes(exact) <= budget_bytes:
        return CaptureChoice(0, exact, nbytes(exact), budget_bytes,
                             f"exact sums ({nbytes(exact) / 2**20:.1f} MB) fit the budget", kind, sum_rows)
    hi, lo = (AUTO_MAX_BUCKETS, AUTO_MIN_BUCKETS) if kind == "rowhash" else (AUTO_MAX_SKETCH, AUTO_MIN_SKETCH)
    k = hi
    while k > lo and nbytes(sum(layer_dims(shapes, kind, k))) > budget_bytes:
        k //= 2
    d = sum(layer_dims(shapes, kind, k))
    what = f"{kind} sketch, {k} buckets" if kind == "rowhash" else f"{kind} sketch {k}"
    return CaptureChoice(k, d, nbytes(d), budget_bytes,
                         f"exact sums ({nbytes(exact) / 2**20:.1f} MB) exceed the budget: {what} "
                         f"({nbytes(d) / 2**20:.1f} MB)", kind, sum_rows)
