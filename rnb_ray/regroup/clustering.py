"""One k-means fit and one silhouette score, for an in-memory array or (through ``distributed.py``) a Ray Dataset.

No Ray and no IO here. A fit is k-means++ seeding on a deterministic sample (the rows whose
``hash(row_id, seed)`` is smallest, so the sample does not depend on how the data is split), then Lloyd
iterations made of ``kmeans.py``'s steps. Where the rows live is a *backend*: ``ArrayBackend`` holds one
array in this process (the sweep's trials, tests, benchmarks); ``distributed.py`` has two Ray backends
(shard actors, or a Ray Data pass per step) for ``rnb regroup``. Every backend runs this module's
``fit``, so the same data and seed give the same clusters whichever runs them, up to float rounding in
how partial sums are split.

The silhouette follows the same pattern: ``silhouette_of_sample`` scores a sample under nearest-centroid
labels; ``silhouette_array`` draws that sample from an array (``silhouette.silhouette_score`` from a
Dataset, scoring chunks in Ray tasks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rnb_ray.errors import RnbError
from rnb_ray.regroup import kmeans as km

log = logging.getLogger(__name__)

SEED_SAMPLE = 20_000  # rows sampled for k-means++ seeding (driver memory is SEED_SAMPLE × d)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")  # where the Lloyd steps run (kmeans_torch.py on cuda)
SILHOUETTE_SALT = 7919  # the silhouette sample must not be the seeding sample


@dataclass
class KMeansResult:
    """A fitted clustering. ``centroids`` are (k, d), unit length for metric=cosine: float64 as the
    Lloyd loop leaves them, float32 from ``distributed.fit_kmeans`` (what regroup writes)."""

    centroids: np.ndarray
    inertia: float
    iterations: int
    converged: bool
    sizes: np.ndarray  # (k,) int64 documents per cluster under ``centroids``
    metric: str = "cosine"
    n: int = 0
    reseeded: int = 0  # empty clusters re-seeded over the run
    history: list[dict[str, float]] = field(default_factory=list)  # per iteration: inertia, shift, seconds
    labels: np.ndarray | None = None  # (n,) int64 nearest centroid of every row: in-process fits only

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


class Backend(Protocol):
    """Where the rows live. Each method returns only a sample, k × d numbers, or a few rows."""

    n: int

    def sample(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(row_ids, X)`` of the ``size`` rows with the smallest ``hash(row_id, seed)``, in row-id order."""

    def partial(self, C: np.ndarray, metric: str, with_moments: bool) -> km.Partial:
        """Every row's share of a Lloyd step against ``C``, added up in a fixed order."""

    def far(self, C: np.ndarray, metric: str, m: int) -> list[km.FarPoint]:
        """The ``m`` rows farthest from their nearest centroid."""


def bottom_rows(row_ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Positions of the ``size`` rows with the smallest ``hash(row_id, seed)`` (ties: lower id), in row-id order.

    A uniform sample without replacement that depends only on the row ids, not on their layout.
    """
    order = np.lexsort((row_ids, km.hash_uniform(row_ids, seed)))[:size]
    return order[np.argsort(row_ids[order], kind="stable")]


class ArrayBackend:
    """All rows in one in-memory array: each step is one ``partial_step`` over the whole array.

    ``device="cpu"`` runs the steps in numpy (``kmeans.py``); another torch device (``"cuda"``) runs them in
    torch (``kmeans_torch.TorchRows``). ``use_torch=True`` forces the torch code on any device (the tests
    run it on the CPU to compare it with numpy).
    """

    def __init__(self, X: np.ndarray, row_ids: np.ndarray | None = None, device: str = "cpu",
                 use_torch: bool | None = None):
        self.X = X
        self.row_ids = np.arange(len(X), dtype=np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
        self.n = len(X)
        self.torch_rows = None
        if use_torch or (use_torch is None and device != "cpu"):
            from rnb_ray.regroup.kmeans_torch import TorchRows

            self.torch_rows = TorchRows(X, device)

    def sample(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if size >= self.n:
            return self.row_ids, self.X
        pick = bottom_rows(self.row_ids, size, seed)
        return self.row_ids[pick], self.X[pick]

    def partial(self, C: np.ndarray, metric: str, with_moments: bool) -> km.Partial:
        if self.torch_rows is not None:
            return self.torch_rows.partial(C, metric, with_moments)
        return km.partial_step(self.X, C, metric, with_moments)  # type: ignore[arg-type]

    def far(self, C: np.ndarray, metric: str, m: int) -> list[km.FarPoint]:
        if self.torch_rows is not None:
            return self.torch_rows.far(self.row_ids, C, metric, m)
        return km.farthest_points(self.X, self.row_ids, C, metric, m)  # type: ignore[arg-type]

    def assign(self, C: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
        if self.torch_rows is not None:
            return self.torch_rows.assign(C, metric)
        return km.assign(self.X, C, metric)  # type: ignore[arg-type]


def check_settings(k: int, metric: str) -> None:
    if metric not in km.METRICS:
        raise RnbError(f"unknown metric {metric!r}", fix=f"use one of {', '.join(km.METRICS)}")
    if k < 1:
        raise RnbError(f"k must be at least 1, got {k}", fix="pass --k 2 or more")


def local_device(device: str) -> str:
    """``device`` for a fit in this process: ``auto`` → ``cuda`` when this process sees a GPU, else ``cpu``;
    ``cuda`` without one is an ``RnbError``."""
    if device not in DEVICES:
        raise RnbError(f"unknown k-means device {device!r}", where="--kmeans-device",
                       fix=f"use one of {', '.join(DEVICES)}")
    if device == "cpu":
        return device
    from rnb_ray.regroup.kmeans_torch import cuda_available

    if cuda_available():
        return "cuda"
    if device == "auto":
        return "cpu"
    raise RnbError("k-means on cuda, but this process sees no GPU", where="--kmeans-device",
                   fix="pass --kmeans-device cpu (or auto), or run where a GPU is visible")


def fit(backend: Backend, k: int, *, metric: str = "cosine", seed: int = 0, max_iter: int = 100, tol: float = 1e-4,
        sample_size: int = SEED_SAMPLE, init: np.ndarray | None = None, verbose: bool = False) -> KMeansResult:
    """k-means++ on ``backend``'s seeding sample (or ``init``), then Lloyd until the shift is below tolerance.

    ``tol`` is relative to the mean feature variance (scikit-learn's rule); 0 runs to an exact fixed point.
    Returns float64 centroids; sizes and inertia are under the final centroids.
    """
    check_settings(k, metric)
    n = backend.n
    if k > n:
        raise RnbError(f"k={k} is greater than the number of non-empty documents ({n})",
                       fix=f"pass --k {max(1, n)} or less, or add documents")
    if init is not None:
        C = np.asarray(init, dtype=np.float64)
        if C.ndim != 2 or C.shape[0] != k:
            raise RnbError(f"init centroids have shape {C.shape}, expected ({k}, d)")
    else:
        _, S = backend.sample(max(sample_size, k), seed)
        C = km.kmeans_plus_plus(S, k, metric, np.random.default_rng(seed))  # type: ignore[arg-type]
        del S
    if metric == "cosine":
        C = km.normalize_rows(C)

    history: list[dict[str, float]] = []
    tol_abs: float | None = None
    converged = False
    reseeded = 0
    last: km.Partial | None = None
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is the iteration count after the loop
        t_iter = time.perf_counter()
        total = backend.partial(C, metric, tol_abs is None)
        if tol_abs is None:
            assert total.moments is not None
            tol_abs = km.tolerance(tol, total.moments, total.n)
        sums, counts = total.sums, total.counts
        n_empty = int((counts == 0).sum())
        if n_empty:
            sums, counts, moved = km.reseed_empty(sums, counts, backend.far(C, metric, n_empty))
            reseeded += moved
        C_new = km.finalize_centroids(sums, counts, C, metric)  # type: ignore[arg-type]
        shift = float(((C_new - C) ** 2).sum())
        history.append({"iteration": it, "inertia": total.inertia, "shift": shift,
                        "seconds": time.perf_counter() - t_iter})
        if verbose:
            log.info("k-means iteration %d: inertia=%.6g shift=%.3g (tol %.3g)%s", it, total.inertia, shift,
                     tol_abs, f", re-seeded {n_empty} empty cluster(s)" if n_empty else "")
        C, last = C_new, total
        if shift <= tol_abs:
            converged = True
            break
    assert last is not None
    if not (converged and history[-1]["shift"] == 0.0):
        last = backend.partial(C, metric, False)  # sizes and inertia under the final centroids
    return KMeansResult(C, float(last.inertia), it, converged, last.counts.astype(np.int64), metric, n, reseeded,
                        history)


def fit_array(X: np.ndarray, k: int, *, metric: str = "cosine", seed: int = 0, max_iter: int = 100,
              tol: float = 1e-4, sample_size: int = SEED_SAMPLE, init: np.ndarray | None = None,
              row_ids: np.ndarray | None = None, device: str = "cpu") -> KMeansResult:
    """k-means in this process on an (n, d) array: ``fit`` on an ``ArrayBackend``, plus every row's label.

    ``row_ids`` (default: positions) choose the seeding sample. ``device``: ``cpu`` (numpy), ``cuda`` (torch
    on this process's GPU) or ``auto`` (cuda when this process sees a GPU). Centroids are float64.
    """
    backend = ArrayBackend(X, row_ids, local_device(device))
    res = fit(backend, k, metric=metric, seed=seed, max_iter=max_iter, tol=tol, sample_size=sample_size, init=init)
    res.labels, _ = backend.assign(res.centroids, metric)
    return res


# --------------------------------------------------------------------------------------------------
# Silhouette (the paper, §3 / Algorithm 2, uses it to pick k).


def silhouette_of_sample(S: np.ndarray, centroids: np.ndarray, metric: str,
                         score: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> float:
    """Mean silhouette of the rows ``S`` among themselves under nearest-centroid labels.

    Like ``sklearn.metrics.silhouette_score`` on a sample. ``score(S, labels)`` returns every row's
    silhouette (default: ``kmeans.silhouette_samples`` in one go; Ray tasks over chunks for large samples).
    NaN when the sample falls in fewer than two clusters (undefined).
    """
    if len(S) < 2:
        return float("nan")
    labels, _ = km.assign(S, np.asarray(centroids, dtype=np.float64), metric)  # type: ignore[arg-type]
    if len(np.unique(labels)) < 2:
        return float("nan")
    # compact label ids so the per-cluster sums only span clusters present in the sample
    _, labels = np.unique(labels, return_inverse=True)
    if score is None:
        return float(km.silhouette_samples(S, labels, metric).mean())  # type: ignore[arg-type]
    return float(score(S, labels).mean())


def silhouette_array(X: np.ndarray, centroids: np.ndarray, *, metric: str = "cosine", sample_size: int = 5_000,
                     seed: int = 0, row_ids: np.ndarray | None = None) -> float:
    """Mean silhouette of about ``sample_size`` rows of ``X`` (smallest ``hash(row_id, seed + SILHOUETTE_SALT)``;
    ``row_ids`` default to positions) under nearest-centroid labels; NaN when undefined. Cost: sample_size² × d.
    """
    ids = np.arange(len(X), dtype=np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
    return silhouette_of_sample(X[bottom_rows(ids, sample_size, seed + SILHOUETTE_SALT)], centroids, metric)
