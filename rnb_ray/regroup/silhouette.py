"""Silhouette score of a clustering, on a deterministic sample of a Ray Dataset of embeddings.

Like ``sklearn.metrics.silhouette_score(..., sample_size=)``: the silhouette of a sample among itself.
Labels are the nearest centroid. The score is ``clustering.silhouette_of_sample`` — the one the sweep computes
per candidate k on its in-memory embeddings (``clustering.silhouette_array``); here the sample (bounded by
``sample_size``) comes from a Dataset, is put in the object store once, and Ray tasks score row chunks of it
in parallel.
"""

from __future__ import annotations

import numpy as np

from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.clustering import SILHOUETTE_SALT, KMeansResult, silhouette_of_sample
from rnb_ray.regroup.distributed import sample_embeddings
from rnb_ray.regroup.embed import EMB_ROW_ID, EMBEDDING

_CHUNK = 512


def silhouette_score(ds, centroids: np.ndarray | KMeansResult, *, metric: str = "cosine",
                     sample_size: int = 5_000, seed: int = 0) -> float:
    """Mean silhouette of about ``sample_size`` rows of ``ds`` under nearest-centroid labels.

    Args:
        ds: Ray Dataset with ``row_id`` and ``embedding`` columns (``EmbeddingSet.dataset()``).
        centroids: (k, d) centroids, or a ``KMeansResult`` (its centroids and metric are used).
        metric: distance for assignment and silhouette: ``"cosine"`` or ``"euclidean"``.
        sample_size: rows scored; cost is sample_size² × d.
        seed: selects the sample (rows with the smallest ``hash(row_id, seed + SILHOUETTE_SALT)``), as
            ``clustering.silhouette_array`` does.

    Returns:
        The score in [-1, 1]; NaN when the sample falls in fewer than two clusters (undefined).
    """
    import ray

    if isinstance(centroids, KMeansResult):
        metric = centroids.metric
        centroids = centroids.centroids
    _, X = sample_embeddings(ds.select_columns([EMB_ROW_ID, EMBEDDING]), sample_size, seed + SILHOUETTE_SALT)

    @ray.remote(num_cpus=1)
    def score_chunk(data: tuple[np.ndarray, np.ndarray], start: int) -> np.ndarray:
        Xs, ls = data
        return km.silhouette_samples(Xs, ls, metric, slice(start, start + _CHUNK))  # type: ignore[arg-type]

    def score(S: np.ndarray, labels: np.ndarray) -> np.ndarray:
        ref = ray.put((S, labels))
        return np.concatenate(ray.get([score_chunk.remote(ref, s) for s in range(0, len(S), _CHUNK)]))

    return silhouette_of_sample(X, centroids, metric, score)
