"""Pure k-means math: seeding, assignment, per-block partial sums, the centroid update, silhouette.

No Ray and no IO here: ``clustering.py`` composes these steps into one fit (seeding, then the Lloyd loop)
that runs on an in-memory array or, through ``distributed.py``, on blocks of a Ray Dataset whose k × d
results it combines.

Metrics (the paper's Regroup step clusters sentence embeddings; both are offered):

* ``euclidean`` — classic k-means: distance ``‖x − c‖²``, centroid = mean of its points.
* ``cosine`` — spherical k-means: distance ``1 − x·c/‖x‖`` with unit centroids, centroid = normalised
  sum of its points. Embeddings from ``embed.py`` are already unit length.

Inertia is the sum of those distances. Distances use float32 matrix products when the data is float32
(as the embeddings are); sums and inertia accumulate in float64.

Cost of a Lloyd step on n rows: the assignment is one n × k × d matrix product (in ``CHUNK``-row blocks,
so memory is ``CHUNK × k`` whatever n); the per-centroid sums add every row once (a sparse indicator
product, n × d), so k in the thousands costs what the assignment costs. ``kmeans_torch.py`` is the same
step in torch, for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import sparse

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[str, ...] = ("cosine", "euclidean")


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


CHUNK = 4096  # rows per distance block: a chunk × k score matrix and the chunk itself stay in cache


class Scorer:
    """Centroids prepared once for many blocks of rows: the assignment step's matrix and a reused buffer.

    A block's scores are one matrix product (BLAS threads do the work) into a ``chunk × k`` buffer, then an
    argmin/argmax over it, so memory stays ``chunk × k`` whatever the number of rows. Distances use the
    rows' precision (float32 embeddings: float32 products, as faiss and scikit-learn do); the returned
    distances are float64.
    """

    def __init__(self, C: np.ndarray, metric: Metric, dtype: np.dtype, chunk: int = CHUNK):
        if metric == "cosine":
            C = normalize_rows(C)  # centroids are unit length already in the algorithm; cheap (k × d)
        Cx = C.astype(dtype, copy=False)
        self.metric, self.chunk, self.k = metric, chunk, len(C)
        if metric == "cosine":
            self.W = Cx.T
        else:
            # argmin ‖x − c‖² = argmin (‖c‖² − 2 x·c). The −2 is folded into the centroids: a power of two, so
            # the products are exactly −2 × (x·c). ‖x‖² is added back only for the distance itself.
            self.W = (-2.0 * Cx).T
            self.c_sq = np.einsum("ij,ij->i", Cx, Cx)
        self._buf = np.empty((0, self.k), dtype=np.result_type(dtype, Cx.dtype))

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int64, distance float64)`` of the rows ``x`` (at most ``chunk`` of them); ties: lower id."""
        if len(self._buf) < len(x):
            self._buf = np.empty((len(x), self.k), dtype=self._buf.dtype)
        scores = self._buf[:len(x)]
        np.matmul(x, self.W, out=scores)
        rows = np.arange(len(x))
        if self.metric == "cosine":
            # rows may not be unit length (user embeddings); cosine uses the direction only
            labels = np.argmax(scores, axis=1)
            xn = np.linalg.norm(x, axis=1).astype(np.float64)
            dist = 1.0 - scores[rows, labels].astype(np.float64) / np.where(xn > 0, xn, 1.0)
        else:
            scores += self.c_sq
            labels = np.argmin(scores, axis=1)
            x_sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
            dist = np.maximum(x_sq + scores[rows, labels].astype(np.float64), 0.0)
        return labels.astype(np.int64, copy=False), dist


def assign(X: np.ndarray, C: np.ndarray, metric: Metric, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: ``(labels int64, distance float64)``; ties go to the lower id."""
    scorer = Scorer(C, metric, X.dtype, chunk)
    labels = np.empty(len(X), dtype=np.int64)
    dist = np.empty(len(X), dtype=np.float64)
    for s in range(0, len(X), chunk):
        labels[s:s + chunk], dist[s:s + chunk] = scorer.nearest(X[s:s + chunk])
    return labels, dist


@dataclass
class Partial:
    """What one block contributes to a Lloyd step: k × d sums, k counts, its inertia, data moments."""

    sums: np.ndarray  # (k, d) float64
    counts: np.ndarray  # (k,) int64
    inertia: float
    n: int = 0
    moments: tuple[np.ndarray, np.ndarray] | None = None  # per-feature sum and sum of squares

    def __add__(self, other: Partial) -> Partial:
        moments = None
        if self.moments is not None and other.moments is not None:
            moments = (self.moments[0] + other.moments[0], self.moments[1] + other.moments[1])
        return Partial(self.sums + other.sums, self.counts + other.counts, self.inertia + other.inertia,
                       self.n + other.n, moments)


def add_cluster_sums(sums: np.ndarray, x: np.ndarray, labels: np.ndarray) -> None:
    """``sums[c] += Σ x[i] over labels[i] == c``, in place (float64 ``sums``; ``x`` in its own precision).

    A sparse ``k × rows`` indicator matrix (one 1 per column, at the row's label) times the rows: every row
    is added once to its cluster, so the cost is ``rows × d`` whatever k. (A dense one-hot product costs
    ``k × rows × d`` — as much as the assignment itself, which doubled the iteration at k in the thousands.)
    Rows are added in order (deterministic), in the data's precision, and the block's result in float64.
    """
    m = len(labels)
    indicator = sparse.csc_matrix((np.ones(m, dtype=x.dtype), labels, np.arange(m + 1)), shape=(len(sums), m))
    sums += indicator @ x


def cluster_sums(X: np.ndarray, labels: np.ndarray, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of rows (float64: the data's precision inside a ``chunk``, float64 across chunks —
    finer than scikit-learn, which accumulates in float32) and counts."""
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    sums = np.zeros((k, X.shape[1]), dtype=np.float64)
    for s in range(0, len(X), chunk):
        add_cluster_sums(sums, X[s:s + chunk], labels[s:s + chunk])
    return sums, counts


def partial_step(X: np.ndarray, C: np.ndarray, metric: Metric, with_moments: bool = False,
                 chunk: int = CHUNK) -> Partial:
    """One block's share of a Lloyd iteration against centroids ``C``.

    ``chunk`` rows at a time, assignment then sums while the rows are in cache; temporaries are
    ``chunk × k``, never ``n × k``.
    """
    k, d = len(C), X.shape[1]
    scorer = Scorer(C, metric, X.dtype, chunk)
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    inertia = 0.0
    m_sum, m_sq = np.zeros(d), np.zeros(d)  # per-feature sum and sum of squares (with_moments)
    for s in range(0, len(X), chunk):
        x = X[s:s + chunk]
        labels, dist = scorer.nearest(x)
        add_cluster_sums(sums, x, labels)
        counts += np.bincount(labels, minlength=k)
        inertia += float(dist.sum())
        if with_moments:
            x64 = x.astype(np.float64)
            m_sum += x64.sum(axis=0)
            m_sq += np.einsum("ij,ij->j", x64, x64)
    return Partial(sums, counts, inertia, len(X), (m_sum, m_sq) if with_moments else None)


def tolerance(tol: float, moments: tuple[np.ndarray, np.ndarray], n: int) -> float:
    """scikit-learn's convention: ``tol`` is relative to the mean per-feature variance of the data."""
    if n == 0 or tol == 0:
        return 0.0
    mean = moments[0] / n
    var = np.maximum(moments[1] / n - mean * mean, 0.0)
    return float(np.mean(var) * tol)


def finalize_centroids(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray, metric: Metric) -> np.ndarray:
    """New centroids from combined sums; a cluster with no points keeps its previous centroid."""
    C = previous.astype(np.float64).copy()
    nz = counts > 0
    C[nz] = sums[nz] / counts[nz, None]
    if metric == "cosine":
        C[nz] = normalize_rows(C[nz])
    return C


@dataclass(order=True)
class FarPoint:
    """A candidate to re-seed an empty cluster: far from its own centroid."""

    neg_dist: float
    row_id: int
    label: int = field(compare=False)
    x: np.ndarray = field(compare=False, repr=False)


def farthest_points(X: np.ndarray, row_ids: np.ndarray, C: np.ndarray, metric: Metric, m: int) -> list[FarPoint]:
    """The ``m`` rows farthest from their nearest centroid (ties: lower row id first)."""
    if m <= 0 or len(X) == 0:
        return []
    labels, dist = assign(X, C, metric)
    return pick_farthest(X, row_ids, labels, dist, m)


def pick_farthest(X: np.ndarray, row_ids: np.ndarray, labels: np.ndarray, dist: np.ndarray, m: int) -> list[FarPoint]:
    """The ``m`` rows with the largest ``dist`` to their centroid ``labels`` (ties: lower row id first)."""
    order = np.lexsort((row_ids, -dist))[:m]
    return [FarPoint(-float(dist[i]), int(row_ids[i]), int(labels[i]), X[i].astype(np.float64)) for i in order]


def reseed_empty(sums: np.ndarray, counts: np.ndarray, far: list[FarPoint]) -> tuple[np.ndarray, np.ndarray, int]:
    """Move the farthest points into empty clusters (scikit-learn's relocation rule).

    Empty clusters, in increasing id, each take the next farthest point (sorted by distance, then row
    id); the point leaves the sums of the cluster it was assigned to. Returns updated sums, counts and
    the number of clusters re-seeded.
    """
    sums, counts = sums.copy(), counts.copy()
    empty = np.flatnonzero(counts == 0)
    far = sorted(far)
    n = 0
    for cid, p in zip(empty, far, strict=False):
        if counts[p.label] <= 1:
            continue  # taking its only point would just move the emptiness elsewhere
        sums[p.label] -= p.x
        counts[p.label] -= 1
        sums[cid] = p.x
        counts[cid] = 1
        n += 1
    return sums, counts, n


# --------------------------------------------------------------------------------------------------
# Seeding.


def kmeans_plus_plus(X: np.ndarray, k: int, metric: Metric, rng: np.random.Generator,
                     n_local_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, as in scikit-learn): (k, d) float64 centroids.

    Each new centroid is the best of ``2 + log k`` candidates drawn with probability ∝ distance to the
    nearest chosen centroid. If every remaining point coincides with a centroid, the candidate is drawn
    uniformly.
    """
    n = len(X)
    if k > n:
        raise ValueError(f"k={k} > {n} points")
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(k))
    X64 = X.astype(np.float64)
    if metric == "cosine":
        X64 = normalize_rows(X64)
    x_sq = (X64 * X64).sum(1)

    def dist_to(c: np.ndarray) -> np.ndarray:
        if metric == "cosine":
            return np.maximum(1.0 - X64 @ c.T, 0.0).T
        return np.maximum(x_sq[None, :] - 2 * c @ X64.T + (c * c).sum(1)[:, None], 0.0)

    centers = np.empty((k, X.shape[1]), dtype=np.float64)
    first = int(rng.integers(n))
    centers[0] = X64[first]
    closest = dist_to(centers[:1])[0]
    for c in range(1, k):
        pot = closest.sum()
        if pot > 0:
            cands = np.searchsorted(np.cumsum(closest), rng.uniform(size=n_local_trials) * pot)
            cands = np.minimum(cands, n - 1)
        else:
            cands = rng.integers(n, size=n_local_trials)
        d_cand = np.minimum(closest[None, :], dist_to(X64[cands]))
        best = int(np.argmin(d_cand.sum(axis=1)))
        centers[c] = X64[cands[best]]
        closest = d_cand[best]
    return centers


def hash_uniform(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) number per row id (splitmix64), independent of block layout."""
    z = row_ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# --------------------------------------------------------------------------------------------------
# Scoring.


def pairwise_distances(A: np.ndarray, B: np.ndarray, metric: Metric) -> np.ndarray:
    """Euclidean (not squared) or cosine (1 − cos) distances, float64, as scikit-learn defines them."""
    A, B = A.astype(np.float64), B.astype(np.float64)
    if metric == "cosine":
        return np.clip(1.0 - normalize_rows(A) @ normalize_rows(B).T, 0.0, 2.0)
    d2 = (A * A).sum(1)[:, None] - 2 * A @ B.T + (B * B).sum(1)[None, :]
    return np.sqrt(np.maximum(d2, 0.0))


def silhouette_samples(X: np.ndarray, labels: np.ndarray, metric: Metric, rows: slice | None = None) -> np.ndarray:
    """Silhouette ``(b − a) / max(a, b)`` of ``X[rows]`` against all of ``X`` (Rousseeuw 1987).

    ``a`` is the mean distance to the other points of its cluster, ``b`` the smallest mean distance to
    another cluster; points alone in their cluster score 0 (scikit-learn's convention).
    """
    rows = rows or slice(0, len(X))
    idx = np.arange(len(X))[rows]
    k = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=k)
    D = pairwise_distances(X[idx], X, metric)
    # per-cluster distance sums via a one-hot product: (r × n) @ (n × k)
    onehot = np.zeros((len(X), k), dtype=np.float64)
    onehot[np.arange(len(X)), labels] = 1.0
    sums = D @ onehot
    own = labels[idx]
    own_count = counts[own]
    a = sums[np.arange(len(idx)), own] / np.maximum(own_count - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = sums / counts[None, :]
    means[np.arange(len(idx)), own] = np.inf
    means[:, counts == 0] = np.inf
    b = means.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (b - a) / np.maximum(a, b)
    s = np.where(own_count > 1, np.nan_to_num(s), 0.0)
    return s
