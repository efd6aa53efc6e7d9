"""The one k-means fit (seeding + Lloyd loop) and silhouette, in process (milliseconds, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score as sk_silhouette
from test_kmeans import blobs

from rnb_ray.errors import RnbError
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.clustering import (
    SILHOUETTE_SALT,
    ArrayBackend,
    bottom_rows,
    fit,
    fit_array,
    silhouette_array,
    silhouette_of_sample,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lloyd_matches_sklearn(seed):
    X = blobs(seed=seed)
    init = X[np.random.default_rng(seed).choice(len(X), 6, replace=False)].astype(np.float64)
    ours = fit_array(X, len(init), metric="euclidean", init=init, max_iter=300, tol=0.0)
    ref = KMeans(6, init=init.astype(np.float32), n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(X)
    np.testing.assert_array_equal(ours.labels, ref.labels_)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)
    np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, atol=1e-4)
    assert ours.converged


def test_empty_cluster_is_reseeded_like_sklearn():
    X = blobs(k=4, seed=3)
    init = X[:4].astype(np.float64).copy()
    init[3] = 1e3  # far from everything: empty after the first assignment
    ours = fit_array(X, len(init), metric="euclidean", init=init, max_iter=300, tol=0.0)
    assert (np.bincount(ours.labels, minlength=4) > 0).all()
    ref = KMeans(4, init=init.astype(np.float32), n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(X)
    np.testing.assert_array_equal(ours.labels, ref.labels_)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)


def test_seeding_sample_is_the_smallest_hashes_in_row_id_order():
    ids = np.arange(1000, dtype=np.int64) * 7 + 3
    pick = bottom_rows(ids, 50, seed=5)
    u = km.hash_uniform(ids, 5)
    assert sorted(pick.tolist()) == sorted(np.argsort(u)[:50].tolist())
    assert (np.diff(ids[pick]) > 0).all()
    X = blobs(n=1000)
    got_ids, S = ArrayBackend(X, ids).sample(50, seed=5)
    np.testing.assert_array_equal(got_ids, ids[pick])
    np.testing.assert_array_equal(S, X[pick])
    all_ids, S_all = ArrayBackend(X, ids).sample(5000, seed=5)  # size >= n: every row
    np.testing.assert_array_equal(all_ids, ids)
    np.testing.assert_array_equal(S_all, X)


def test_fit_array_is_seeded_kmeans_plus_plus_then_lloyd():
    X = km.normalize_rows(blobs(n=800, d=12, k=6, seed=8)).astype(np.float32)
    a = fit_array(X, 6, metric="cosine", seed=3, sample_size=300, max_iter=50)
    b = fit_array(X, 6, metric="cosine", seed=3, sample_size=300, max_iter=50)
    np.testing.assert_array_equal(a.centroids, b.centroids)  # deterministic
    init = km.kmeans_plus_plus(X[bottom_rows(np.arange(800), 300, 3)], 6, "cosine", np.random.default_rng(3))
    c = fit(ArrayBackend(X), 6, metric="cosine", init=init, max_iter=50)
    np.testing.assert_array_equal(a.centroids, c.centroids)  # seeding = k-means++ on the hash sample
    assert a.centroids.dtype == np.float64 and a.k == 6 and a.n == 800
    np.testing.assert_array_equal(a.labels, km.assign(X, a.centroids, "cosine")[0])
    np.testing.assert_array_equal(a.sizes, np.bincount(a.labels, minlength=6))
    assert a.inertia == pytest.approx(float(km.assign(X, a.centroids, "cosine")[1].sum()), rel=1e-12)
    with pytest.raises(RnbError, match="greater than the number"):
        fit_array(X[:5], 6)
    with pytest.raises(RnbError, match="unknown metric"):
        fit_array(X, 6, metric="manhattan")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_array_matches_sklearn(metric):
    X = blobs(n=300, k=4, seed=6)
    C = X[:4].astype(np.float64)
    labels = km.assign(X, C, metric)[0]
    ours = silhouette_array(X, C, metric=metric, sample_size=1000)  # sample >= n: every row
    assert ours == pytest.approx(sk_silhouette(X.astype(np.float64), labels, metric=metric), abs=1e-6)
    # a sample: the rows with the smallest hashes (salted), scored among themselves
    pick = bottom_rows(np.arange(300), 100, 9 + SILHOUETTE_SALT)
    assert silhouette_array(X, C, metric=metric, sample_size=100, seed=9) == \
        silhouette_of_sample(X[pick], C, metric)
    chunked = silhouette_of_sample(X[pick], C, metric, lambda S, lab: np.concatenate(
        [km.silhouette_samples(S, lab, metric, slice(i, i + 32)) for i in range(0, len(S), 32)]))  # type: ignore[arg-type]
    assert chunked == pytest.approx(silhouette_of_sample(X[pick], C, metric), abs=1e-12)
    assert np.isnan(silhouette_array(X, C[:1], metric=metric))  # one cluster: undefined


def test_many_empty_clusters_at_large_k_are_reseeded_like_sklearn():
    """k = 96 on 400 points with a third of the initial centroids far from everything."""
    X = blobs(n=400, d=8, k=12, seed=11)
    init = X[np.random.default_rng(11).choice(len(X), 96, replace=False)].astype(np.float64)
    init[::3] = 1e3 + np.arange(32)[:, None]  # 32 clusters empty after the first assignment
    ours = fit_array(X, 96, metric="euclidean", init=init, max_iter=300, tol=0.0)
    assert ours.reseeded >= 32 and (np.bincount(ours.labels, minlength=96) > 0).all()
    ref = KMeans(96, init=init.astype(np.float32), n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(X)
    np.testing.assert_array_equal(ours.labels, ref.labels_)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)


def test_seeding_at_large_k_is_kmeans_plus_plus_on_the_bounded_sample():
    """k-means++ runs on at most max(sample_size, k) rows, and every centroid is a distinct sample row."""
    X = km.normalize_rows(blobs(n=3000, d=8, k=10, seed=12)).astype(np.float32)
    res = fit_array(X, 300, metric="cosine", seed=1, sample_size=500, max_iter=1)
    assert res.k == 300 and res.sizes.sum() == 3000
    init = km.kmeans_plus_plus(X[bottom_rows(np.arange(3000), 500, 1)], 300, "cosine", np.random.default_rng(1))
    assert len({tuple(r) for r in np.round(init, 6)}) == 300
    np.testing.assert_array_equal(fit(ArrayBackend(X), 300, metric="cosine", init=init, max_iter=1).centroids,
                                  res.centroids)
    with pytest.raises(RnbError, match="unknown k-means device"):
        fit_array(X, 3, device="tpu")
