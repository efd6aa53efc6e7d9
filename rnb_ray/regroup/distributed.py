"""k-means over a Ray Dataset of embeddings: the driver only ever holds k × d numbers.

The fit itself (seeding, the Lloyd loop) is ``clustering.fit``, the same one ``clustering.fit_array`` runs
in one process; this module provides the two Ray backends it runs on. Each Lloyd step asks every part of
the data for per-centroid sums and counts against the broadcast centroids (``kmeans.partial_step``) and
adds the k × d results up; the driver divides. Two engines run the parts:

* ``actors`` (default): the dataset is split, in block order, over ``KMeansShard`` actors that keep
  their shard in memory for the whole fit (as Spark MLlib caches an RDD); a step is one method call
  per actor. Per-iteration overhead is milliseconds.
* ``data``: every step is a ``map_batches`` pass over the materialised dataset (blocks in the object
  store, which spills to disk) — nothing held in worker memory, for data larger than the cluster's
  memory, at the price of a Ray Data execution per iteration.

The per-row work runs in numpy on CPUs, or in torch on GPUs (``device="cuda"``, ``kmeans_torch.py``: each
actor or task takes one GPU); ``auto`` picks cuda when the cluster has a GPU.

Seeding is k-means++ on a bounded, deterministic sample (rows whose ``hash(row_id, seed)`` is smallest),
so it does not depend on how the data is split. Empty clusters are re-seeded with the points farthest
from their centroid (an extra step, only when it happens). Partial sums are added in a fixed order
(actor order / block order), so a run is bitwise reproducible and Lloyd reaches exact fixed points.

The dataset needs the columns ``row_id`` (int64) and ``embedding`` (fixed_size_list<float32>), as
``EmbeddingSet.dataset()`` provides.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from rnb_ray.errors import RnbError
from rnb_ray.ray_env import ordered_execution, require_resources
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.clustering import (
    DEVICES,
    SEED_SAMPLE,
    ArrayBackend,
    KMeansResult,
    bottom_rows,
    check_settings,
    fit,
)
from rnb_ray.regroup.embed import EMB_ROW_ID, EMBEDDING, embeddings_array, embeddings_numpy

__all__ = ["KMeansResult", "KMeansShard", "fit_kmeans", "kmeans_device", "sample_embeddings"]

log = logging.getLogger(__name__)


def _block_arrays(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(batch.column(EMB_ROW_ID).to_numpy(), dtype=np.int64), embeddings_numpy(batch.column(EMBEDDING)))


def _one_row(obj: Any) -> pa.Table:
    return pa.table({"p": pa.array([pickle.dumps(obj, protocol=5)], pa.large_binary())})


def _stream(ds) -> Iterator[Any]:
    """Unpickle the one-row results of a map_batches pass as they arrive, in block order."""
    with ordered_execution(quiet=True):
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for v in batch.column("p").to_pylist():
                yield pickle.loads(v)


def _partial_fn(batch: pa.Table, C: np.ndarray, metric: str, with_moments: bool, device: str) -> pa.Table:
    _, X = _block_arrays(batch)
    if device != "cpu":
        from rnb_ray.regroup.kmeans_torch import TorchRows

        return _one_row(TorchRows(X, device).partial(C, metric, with_moments))
    return _one_row(km.partial_step(X, C, metric, with_moments))  # type: ignore[arg-type]


def _far_fn(batch: pa.Table, C: np.ndarray, metric: str, m: int, device: str) -> pa.Table:
    ids, X = _block_arrays(batch)
    if device != "cpu":
        from rnb_ray.regroup.kmeans_torch import TorchRows

        return _one_row(TorchRows(X, device).far(ids, C, metric, m))
    return _one_row(km.farthest_points(X, ids, C, metric, m))  # type: ignore[arg-type]


def _sample_rows(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions of the rows whose ``hash(row_id, seed)`` is below ``fraction`` (a superset of the sample)."""
    return np.flatnonzero(km.hash_uniform(ids, seed) < fraction)


def _sample_fn(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    ids, _ = _block_arrays(batch)
    return batch.select([EMB_ROW_ID, EMBEDDING]).take(pa.array(_sample_rows(ids, fraction, seed)))


def _map(ds, fn: Callable, num_gpus: float = 0, **kwargs: Any):
    with ordered_execution(quiet=True):
        return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow", num_cpus=1,
                              num_gpus=num_gpus or None)


def _bottom(tables: list[pa.Table], size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the ``size`` smallest hash values, in row-id order (``clustering.bottom_rows``)."""
    table = pa.concat_tables(tables)
    ids = table.column(EMB_ROW_ID).to_numpy()
    order = bottom_rows(ids, size, seed)
    return ids[order].astype(np.int64), embeddings_numpy(table.column(EMBEDDING).take(pa.array(order)))


def _sample_fraction(size: int, n: int) -> float:
    return 1.0 if size >= n else min(1.0, (1.25 * size + 32) / n)


def sample_embeddings(ds, size: int, seed: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """About ``size`` rows chosen by smallest ``hash(row_id, seed)``: ``(row_ids, X)``, deterministic.

    The driver holds only the sample (bounded by ``size``), never the dataset.
    """
    n = ds.count() if n is None else n
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    fraction = _sample_fraction(size, n)
    while True:
        parts = []
        with ordered_execution(quiet=True):
            sampled = ds.map_batches(_sample_fn, fn_kwargs={"fraction": fraction, "seed": seed},
                                     batch_size=None, batch_format="pyarrow", num_cpus=1)
            for batch in sampled.iter_batches(batch_size=None, batch_format="pyarrow"):
                if batch.num_rows:
                    parts.append(batch)
        got = sum(t.num_rows for t in parts)
        if got >= min(size, n) or fraction >= 1.0:
            break
        fraction = 1.0  # unlucky draw (tiny samples only): take everything
    return _bottom(parts, size, seed)


# --------------------------------------------------------------------------------------------------
# Backends (``clustering.Backend``): where the per-block work runs.


class _DataBackend:
    """Every step is one streaming ``map_batches`` pass over the (optionally materialised) dataset.

    Holds nothing in worker memory between passes: for data larger than the cluster's memory (the
    object store spills to disk). Each pass pays Ray Data's per-execution start-up.
    """

    def __init__(self, ds, materialize: bool = True, device: str = "cpu"):
        import ray

        self.device = device
        ds = ds.select_columns([EMB_ROW_ID, EMBEDDING])
        if materialize:
            with ordered_execution(quiet=True):
                ds = ds.materialize()
                cpus = int(ray.cluster_resources().get("CPU", 1))
                if ds.num_blocks() < 2 * cpus and ds.count() >= 4 * cpus:
                    ds = ds.repartition(2 * cpus).materialize()  # enough blocks to keep every CPU busy
        self.ds = ds
        self.n = ds.count()

    def sample(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return sample_embeddings(self.ds, size, seed, self.n)

    def partial(self, C: np.ndarray, metric: str, with_moments: bool) -> km.Partial:
        total: km.Partial | None = None
        for p in _stream(_map(self.ds, _partial_fn, self._gpus, C=C, metric=metric, with_moments=with_moments,
                              device=self.device)):
            total = p if total is None else total + p
        assert total is not None
        return total

    def far(self, C: np.ndarray, metric: str, m: int) -> list[km.FarPoint]:
        far: list[km.FarPoint] = []
        for block_far in _stream(_map(self.ds, _far_fn, self._gpus, C=C, metric=metric, m=m, device=self.device)):
            far = sorted(far + block_far)[:m]
        return far

    @property
    def _gpus(self) -> float:
        return 0 if self.device == "cpu" else 1

    def close(self) -> None:
        self.ds = None


class KMeansShard:
    """A Ray actor holding one shard of the embeddings in memory for the whole fit (Spark-style cache).

    Every step is then one method call per actor — milliseconds of overhead instead of a Ray Data
    execution per iteration — and each actor returns only k × d numbers. With ``device="cuda"`` the shard
    also goes to the actor's GPU once (``kmeans_torch.TorchRows``) and the steps run there.
    """

    def __init__(self, shard, device: str = "cpu") -> None:
        ids, xs = [], []
        for batch in shard.iter_batches(batch_size=None, batch_format="pyarrow"):
            i, x = _block_arrays(batch)
            ids.append(i)
            xs.append(x)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.X = np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)
        # the same numpy-or-torch dispatch as an in-process fit (an empty shard never touches a device)
        self.rows = ArrayBackend(self.X, self.ids, device if len(self.ids) else "cpu")

    def count(self) -> int:
        return len(self.ids)

    def sample(self, fraction: float, seed: int) -> pa.Table:
        keep = _sample_rows(self.ids, fraction, seed)
        if not len(keep):
            return pa.table({EMB_ROW_ID: pa.array([], pa.int64())})
        return pa.table({EMB_ROW_ID: pa.array(self.ids[keep]), EMBEDDING: embeddings_array(self.X[keep])})

    def partial(self, C: np.ndarray, metric: str, with_moments: bool) -> km.Partial | None:
        if not len(self.ids):
            return None
        return self.rows.partial(C, metric, with_moments)

    def far(self, C: np.ndarray, metric: str, m: int) -> list[km.FarPoint]:
        return self.rows.far(C, metric, m)


class _ActorBackend:
    """The embeddings split (deterministically, in block order) over ``num_shards`` KMeansShard actors."""

    def __init__(self, ds, num_shards: int | None, device: str = "cpu"):
        import ray

        gpus = device != "cpu"
        # one actor per CPU, or per GPU: a GPU's step over a million rows takes milliseconds
        slots = int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1))
        with ordered_execution(quiet=True):
            mat = ds.select_columns([EMB_ROW_ID, EMBEDDING]).materialize()
            n = mat.count()
            if num_shards is None:
                num_shards = max(1, min(slots, n // 2_000 or 1))  # tiny data: fewer actors to start
            require_resources(cpus=num_shards, gpus=num_shards if gpus else 0,
                              what=f"k-means ({num_shards} shard actor(s) × 1 CPU{' + 1 GPU' if gpus else ''})")
            if mat.num_blocks() < num_shards and n >= num_shards:
                mat = mat.repartition(num_shards).materialize()
            shards = mat.split(num_shards, equal=False)  # contiguous block ranges: deterministic
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(KMeansShard)
        self.actors = [actor_cls.remote(s, device) for s in shards]
        counts = ray.get([a.count.remote() for a in self.actors])
        del mat, shards  # the actors hold the data now; let the object store free it
        self.n = int(sum(counts))

    def sample(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        import ray

        fraction = _sample_fraction(size, self.n)
        tables = [t for t in ray.get([a.sample.remote(fraction, seed) for a in self.actors]) if t.num_rows]
        if sum(t.num_rows for t in tables) < min(size, self.n) and fraction < 1.0:
            tables = [t for t in ray.get([a.sample.remote(1.0, seed) for a in self.actors]) if t.num_rows]
        return _bottom(tables, size, seed)

    def partial(self, C: np.ndarray, metric: str, with_moments: bool) -> km.Partial:
        import ray

        ref = ray.put(C)
        total: km.Partial | None = None
        for p in ray.get([a.partial.remote(ref, metric, with_moments) for a in self.actors]):  # actor order
            if p is not None:
                total = p if total is None else total + p
        assert total is not None
        return total

    def far(self, C: np.ndarray, metric: str, m: int) -> list[km.FarPoint]:
        import ray

        far: list[km.FarPoint] = []
        for block_far in ray.get([a.far.remote(C, metric, m) for a in self.actors]):
            far = sorted(far + block_far)[:m]
        return far

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def kmeans_device(device: str, num_shards: int | None = None) -> str:
    """``device`` resolved against the cluster: ``auto`` → ``cuda`` when it has a GPU, else ``cpu``.

    ``cuda`` on a cluster without enough GPUs (one per shard actor) is an ``RnbError`` at once, before any
    work, not actors waiting forever for a GPU.
    """
    import ray

    if device not in DEVICES:
        raise RnbError(f"unknown k-means device {device!r}", where="--kmeans-device",
                       fix=f"use one of {', '.join(DEVICES)}")
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if device == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    if device == "cuda":
        require_resources(gpus=num_shards or 1, what="k-means with --kmeans-device cuda",
                          gpu_fix="pass --kmeans-device cpu (or auto), or add GPU nodes to the cluster")
    return device


def fit_kmeans(ds, k: int, *, metric: str = "cosine", seed: int = 0, max_iter: int = 100, tol: float = 1e-4,
               sample_size: int = SEED_SAMPLE, init: np.ndarray | None = None, engine: str = "actors",
               num_shards: int | None = None, device: str = "auto", verbose: bool = True) -> KMeansResult:
    """Distributed k-means (k-means++ seeding on a sample, then exact Lloyd) over a Ray Dataset.

    The fit is ``clustering.fit`` (the same seeding and Lloyd loop as ``clustering.fit_array`` in one process),
    with the per-row work on Ray.

    Args:
        ds: Ray Dataset with ``row_id`` (int64) and ``embedding`` (fixed_size_list<float32>) columns,
            e.g. ``EmbeddingSet.dataset()``.
        k: number of clusters (1 ≤ k ≤ rows).
        metric: ``"cosine"`` (spherical k-means, unit centroids) or ``"euclidean"``.
        seed: seeds the sample and k-means++; the same inputs give the same result.
        max_iter: Lloyd iterations at most.
        tol: stop when Σ‖c_new − c‖² ≤ tol × mean feature variance (scikit-learn's rule); 0 runs to an
            exact fixed point.
        sample_size: rows sampled for k-means++ seeding (driver memory is sample_size × d).
        init: optional (k, d) initial centroids; skips seeding.
        engine: ``"actors"`` (default) keeps the embeddings in ``num_shards`` actors' memory for the
            whole fit, one method call per actor per step; ``"data"`` runs every step as a streaming
            Ray Data pass over the materialised dataset (object store, spills to disk) — for data that
            does not fit in the cluster's memory, at a higher per-iteration cost.
        num_shards: actors for ``engine="actors"`` (default: the cluster's CPUs, or its GPUs on cuda;
            fewer for tiny data).
        device: ``"cpu"`` (numpy on CPUs), ``"cuda"`` (torch, one GPU per actor or task; an ``RnbError`` at
            once when the cluster has too few) or ``"auto"`` (cuda when the cluster has a GPU).
        verbose: log one line per iteration (inertia, shift) at INFO.

    Returns:
        KMeansResult with float32 centroids, inertia and sizes under those centroids, iterations,
        whether it converged within ``max_iter``, and the per-iteration history.
    """
    check_settings(k, metric)
    if engine not in ("actors", "data"):
        raise RnbError(f"unknown k-means engine {engine!r}", fix="use 'actors' or 'data'")
    device = kmeans_device(device, num_shards if engine == "actors" else None)
    if verbose:
        log.info("k-means: k=%d, %s engine, on %s", k, engine, device)
    backend: _ActorBackend | _DataBackend = _ActorBackend(ds, num_shards, device) if engine == "actors" \
        else _DataBackend(ds, device=device)
    try:
        res = fit(backend, k, metric=metric, seed=seed, max_iter=max_iter, tol=tol, sample_size=sample_size,
                  init=init, verbose=verbose)
    finally:
        backend.close()
    res.centroids = res.centroids.astype(np.float32)
    return res
