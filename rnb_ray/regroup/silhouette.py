"""Silhouette score of a clustering, on a deterministic sample of a Ray Dataset of embeddings.

Like ``sklearn.metrics.silhouette_score(..., sample_size=)``: the silhouette of a sample among itself.
Labels are the nearest centroid. The sample (bounded by ``sample_size``) is put in the object store once
and Ray tasks score row chunks of it in parallel; the math is ``kmeans.silhouette_samples``.
The paper (§3, Algorithm 2) uses silhouette to pick k; ``rnb sweep`` calls this per candidate k.
"""

from __future__ import annotations

import numpy as np

from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.distributed import KMeansResult, sample_embeddings

_CHUNK = 512


def silhouette_score(ds, centroids: np.ndarray | KMeansResult, *, metric: str = "cosine",
                     sample_size: int = 5_000, seed: int = 0) -> float:
    """Mean silhouette of about ``sample_size`` rows of ``ds`` under nearest-centroid labels.

    Args:
        ds: Ray Dataset with ``row_id`` and ``embedding`` columns (``EmbeddingSet.dataset()``).
        centroids: (k, d) centroids, or a ``KMeansResult`` (its centroids and metric are used).
        metric: distance for assignment and silhouette: ``"cosine"`` or ``"euclidean"``.
        sample_size: rows scored; cost is sample_size² × d.
        seed: selects the sample (rows with the smallest ``hash(row_id, seed)``).

    Returns:
        The score in [-1, 1]; NaN when the sample falls in fewer than two clusters (undefined).
    """
    import ray

    if isinstance(centroids, KMeansResult):
        metric = centroids.metric
        centroids = centroids.centroids
    C = np.asarray(centroids, dtype=np.float64)
    _, X = sample_embeddings(ds.select_columns(["row_id", "embedding"]), sample_size, seed + 7919)
    if len(X) < 2:
        return float("nan")
    labels, _ = km.assign(X, C, metric)  # type: ignore[arg-type]
    if len(np.unique(labels)) < 2:
        return float("nan")
    # compact label ids so the per-cluster sums only span clusters present in the sample
    _, labels = np.unique(labels, return_inverse=True)
    ref = ray.put((X, labels))

    @ray.remote(num_cpus=1)
    def score(data: tuple[np.ndarray, np.ndarray], start: int) -> np.ndarray:
        Xs, ls = data
        return km.silhouette_samples(Xs, ls, metric, slice(start, start + _CHUNK))  # type: ignore[arg-type]

    parts = ray.get([score.remote(ref, s) for s in range(0, len(X), _CHUNK)])
    return float(np.concatenate(parts).mean())
