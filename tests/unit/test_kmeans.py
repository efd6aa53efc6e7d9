"""Pure k-means math against scikit-learn and brute force (milliseconds, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_samples as sk_silhouette_samples

from rnb_ray.regroup import kmeans as km


def blobs(n: int = 600, d: int = 16, k: int = 5, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    X = centers[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    return X.astype(dtype)


def test_assign_matches_brute_force():
    X = blobs()
    C = X[:7].astype(np.float64) + 0.1
    labels, dist = km.assign(X, C, "euclidean")
    brute = ((X[:, None, :].astype(np.float64) - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, brute.argmin(1))
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4, atol=1e-3)
    labels_c, dist_c = km.assign(X, C, "cosine")
    cos = km.normalize_rows(X.astype(np.float64)) @ km.normalize_rows(C).T
    np.testing.assert_array_equal(labels_c, cos.argmax(1))
    np.testing.assert_allclose(dist_c, 1 - cos.max(1), atol=1e-5)


def test_partials_add_up_to_whole():
    X = blobs(dtype=np.float64)  # float64 data: sums are exact to rounding whatever the blocking
    C = X[:5].astype(np.float64)
    whole = km.partial_step(X, C, "euclidean", with_moments=True)
    parts = [km.partial_step(X[i:i + 97], C, "euclidean", with_moments=True) for i in range(0, len(X), 97)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    np.testing.assert_allclose(total.sums, whole.sums, rtol=1e-12)
    np.testing.assert_array_equal(total.counts, whole.counts)
    assert total.n == len(X)
    assert total.inertia == pytest.approx(whole.inertia, rel=1e-12)
    for a, b in zip(total.moments, whole.moments, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # float32 data: float32 rounding inside a chunk only
    X32 = X.astype(np.float32)
    labels = km.assign(X32, X[:5], "euclidean")[0]
    sums, counts = km.cluster_sums(X32, labels, 5, chunk=64)
    exact = np.stack([X32[labels == c].astype(np.float64).sum(0) for c in range(5)])
    np.testing.assert_allclose(sums, exact, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=5))


def test_cosine_lloyd_has_unit_centroids_and_decreasing_inertia():
    X = km.normalize_rows(blobs(d=8, seed=4)).astype(np.float32)
    init = X[:5].astype(np.float64)
    inertias = []
    C = init
    for _ in range(6):
        p = km.partial_step(X, C, "cosine")
        inertias.append(p.inertia)
        C = km.finalize_centroids(p.sums, p.counts, C, "cosine")
    assert all(b <= a + 1e-9 for a, b in zip(inertias, inertias[1:], strict=False))
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-12)


def test_kmeans_plus_plus_is_seeded_and_spreads_out():
    X = blobs(k=5, seed=5)
    a = km.kmeans_plus_plus(X, 5, "euclidean", np.random.default_rng(7))
    b = km.kmeans_plus_plus(X, 5, "euclidean", np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    # each chosen centre is a data point, and they land in 5 different true blobs most of the time:
    # check they are pairwise far apart compared with the within-blob spread (~sqrt(2*16))
    d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
    assert d[np.triu_indices(5, 1)].min() > 6
    # duplicates only: falls back to uniform draws instead of dividing by zero
    same = np.ones((10, 3), dtype=np.float32)
    assert km.kmeans_plus_plus(same, 3, "cosine", np.random.default_rng(0)).shape == (3, 3)


def test_hash_uniform_is_deterministic_and_uniform():
    ids = np.arange(100_000, dtype=np.int64)
    u = km.hash_uniform(ids, 3)
    np.testing.assert_array_equal(u, km.hash_uniform(ids, 3))
    assert not np.array_equal(u, km.hash_uniform(ids, 4))
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 9_000


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_matches_sklearn(metric):
    X = blobs(n=300, k=4, seed=6)
    labels = km.assign(X, X[:4].astype(np.float64), "euclidean")[0]
    labels[0] = 3  # make sure no cluster is degenerate in an unusual way
    ours = np.concatenate([km.silhouette_samples(X, labels, metric, slice(i, i + 64)) for i in range(0, 300, 64)])
    ref = sk_silhouette_samples(X.astype(np.float64), labels, metric=metric)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_tolerance_is_relative_to_feature_variance():
    X = blobs().astype(np.float64)
    p = km.partial_step(X, X[:3], "euclidean", with_moments=True)
    assert km.tolerance(1e-4, p.moments, p.n) == pytest.approx(np.var(X, axis=0).mean() * 1e-4, rel=1e-9)


def test_cluster_sums_at_large_k_match_brute_force_with_empty_clusters():
    """The sparse-indicator sums (cost rows × d, whatever k): exact per cluster, zeros for empty ones."""
    X = blobs(n=500, d=24, seed=9)
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 700, size=len(X)) * 2  # k = 1,400 > rows: most clusters empty, only even ids used
    sums, counts = km.cluster_sums(X, labels, 1400, chunk=64)
    brute = np.zeros((1400, 24))
    np.add.at(brute, labels, X.astype(np.float64))
    np.testing.assert_allclose(sums, brute, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=1400))
    assert (sums[1::2] == 0).all() and (counts[1::2] == 0).all()
    X64 = X.astype(np.float64)  # float64 rows: the same sums to rounding whatever the chunking
    np.testing.assert_allclose(km.cluster_sums(X64, labels, 1400, chunk=7)[0], brute, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_assign_and_partial_step_do_not_depend_on_the_chunk(metric):
    X = blobs(n=1000, d=16, seed=10)
    C = X[::9].astype(np.float64)  # k = 112
    labels, dist = km.assign(X, C, metric)
    for chunk in (1, 37, 999, 5000):
        lab_c, dist_c = km.assign(X, C, metric, chunk=chunk)
        np.testing.assert_array_equal(lab_c, labels)
        np.testing.assert_allclose(dist_c, dist, rtol=1e-5, atol=1e-3)  # float32 ‖x‖² − 2x·c + ‖c‖² (~100)
    whole = km.partial_step(X, C, metric, with_moments=True)
    small = km.partial_step(X, C, metric, with_moments=True, chunk=37)
    np.testing.assert_array_equal(small.counts, whole.counts)
    np.testing.assert_allclose(small.sums, whole.sums, rtol=1e-5, atol=1e-4)
    assert small.inertia == pytest.approx(whole.inertia, rel=1e-7)
    assert small.n == whole.n == 1000
    for a, b in zip(small.moments, whole.moments, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9)
    # the pieces agree with each other: counts are the labels' histogram, inertia the distances' sum
    np.testing.assert_array_equal(whole.counts, np.bincount(labels, minlength=len(C)))
    assert whole.inertia == pytest.approx(float(dist.sum()), rel=1e-9)
    assert km.assign(X[:0], C, metric)[0].shape == (0,)
