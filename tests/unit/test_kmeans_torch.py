"""The torch Lloyd step (the GPU path) run on the CPU against numpy, and the k-means device setting.

No GPU needed: ``TorchRows(X, "cpu")`` is the code that runs on cuda, on another device. What needs a GPU
(``cuda`` actually running) is checked where one is lent; here, ``cuda`` without one is a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from test_kmeans import blobs

from rnb_ray.config import load_config
from rnb_ray.errors import RnbError
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup import kmeans_torch as kt
from rnb_ray.regroup.clustering import ArrayBackend, fit, fit_array, local_device
from rnb_ray.regroup.config import RegroupConfig

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_torch_step_matches_numpy(metric):
    X = blobs(n=3000, d=32, k=20, seed=1)
    C = X[::60].astype(np.float64)  # k = 50
    rows = kt.TorchRows(X, "cpu", chunk=700)  # several chunks, the last one short
    labels, dist = rows.assign(C, metric)
    ref_labels, ref_dist = km.assign(X, C, metric)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-3)
    p, ref = rows.partial(C, metric, with_moments=True), km.partial_step(X, C, metric, with_moments=True)
    np.testing.assert_array_equal(p.counts, ref.counts)
    np.testing.assert_allclose(p.sums, ref.sums, rtol=1e-5, atol=1e-3)
    assert p.sums.dtype == np.float64 and p.counts.dtype == np.int64 and p.n == 3000
    assert p.inertia == pytest.approx(ref.inertia, rel=1e-6)
    for a, b in zip(p.moments, ref.moments, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9)
    ids = np.arange(3000, dtype=np.int64) * 3
    assert [f.row_id for f in rows.far(ids, C, metric, 5)] == [f.row_id for f in km.farthest_points(X, ids, C, metric, 5)]
    assert rows.far(ids, C, metric, 0) == []


def test_fit_on_torch_matches_sklearn_with_an_empty_cluster():
    """The whole fit with its steps in torch: scikit-learn's labels, inertia within 1e-4, re-seeding."""
    X = blobs(k=4, seed=3)
    init = X[:6].astype(np.float64).copy()
    init[5] = 1e3  # empty after the first assignment
    backend = ArrayBackend(X, use_torch=True)  # device="cpu": the torch code on the CPU
    assert backend.torch_rows is not None
    ours = fit(backend, 6, metric="euclidean", init=init, max_iter=300, tol=0.0)
    ref = KMeans(6, init=init.astype(np.float32), n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(X)
    labels, _ = backend.assign(ours.centroids, "euclidean")
    np.testing.assert_array_equal(labels, ref.labels_)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)
    assert ours.reseeded >= 1
    numpy_fit = fit(ArrayBackend(X), 6, metric="euclidean", init=init, max_iter=300, tol=0.0)
    assert ours.iterations == numpy_fit.iterations
    np.testing.assert_allclose(ours.centroids, numpy_fit.centroids, atol=1e-5)


def test_cosine_fit_on_torch_gives_the_numpy_labels():
    X = km.normalize_rows(blobs(n=800, d=12, k=6, seed=8)).astype(np.float32)
    a = fit_array(X, 40, metric="cosine", seed=3, sample_size=300, max_iter=50)
    backend = ArrayBackend(X, use_torch=True)
    b = fit(backend, 40, metric="cosine", seed=3, sample_size=300, max_iter=50)
    np.testing.assert_array_equal(backend.assign(b.centroids, "cosine")[0], a.labels)
    np.testing.assert_array_equal(b.sizes, a.sizes)
    assert b.inertia == pytest.approx(a.inertia, rel=1e-6)


def test_exact_fp32_restores_the_process_setting():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as a training script might set it
    try:
        with kt.exact_fp32():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_device_setting(monkeypatch):
    assert local_device("cpu") == "cpu"
    monkeypatch.setattr(kt, "cuda_available", lambda: False)
    assert local_device("auto") == "cpu"
    with pytest.raises(RnbError, match="sees no GPU.*--kmeans-device cpu"):
        local_device("cuda")
    monkeypatch.setattr(kt, "cuda_available", lambda: True)
    assert local_device("auto") == "cuda" and local_device("cuda") == "cuda"
    with pytest.raises(RnbError, match="unknown k-means device 'gpu'"):
        local_device("gpu")
    assert RegroupConfig(output="o").kmeans_device == "auto"
    assert load_config(RegroupConfig, None, {"output": "o", "kmeans_device": "cuda"}).kmeans_device == "cuda"
    with pytest.raises(RnbError, match="kmeans_device"):
        load_config(RegroupConfig, None, {"output": "o", "kmeans_device": "tpu"})


@no_cuda
def test_fit_array_on_cuda_without_a_gpu_is_a_one_line_error():
    X = blobs(n=50)
    with pytest.raises(RnbError) as e:
        fit_array(X, 3, device="cuda")
    assert "\n" not in str(e.value) and "--kmeans-device cpu" in str(e.value)
    auto = fit_array(X, 3, device="auto", seed=2)  # no GPU: the numpy path, the same fit
    np.testing.assert_array_equal(auto.centroids, fit_array(X, 3, device="cpu", seed=2).centroids)


def test_kmeans_device_against_the_cluster(monkeypatch):
    """auto follows the cluster's GPUs; cuda on a cluster without (enough) GPUs fails at once."""
    import ray

    from rnb_ray.regroup.distributed import kmeans_device

    resources = {"CPU": 2.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert kmeans_device("auto") == "cpu" and kmeans_device("cpu") == "cpu"
    with pytest.raises(RnbError) as e:
        kmeans_device("cuda")
    msg = str(e.value)
    assert "needs 1 GPUs but the Ray cluster has 0" in msg and "--kmeans-device cpu" in msg and "\n" not in msg
    resources["GPU"] = 1.0
    assert kmeans_device("auto") == "cuda" and kmeans_device("cuda") == "cuda"
    with pytest.raises(RnbError, match="needs 2 GPUs"):
        kmeans_device("cuda", num_shards=2)
    with pytest.raises(RnbError, match="unknown k-means device"):
        kmeans_device("gpu")
