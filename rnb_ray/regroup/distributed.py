"""k-means over a Ray Dataset of embeddings: the driver only ever holds k × d numbers.

Each Lloyd iteration is one ``map_batches`` pass: every block computes per-centroid sums and counts
against the broadcast centroids (``kmeans.partial_step``) and returns them as one small row; the driver
adds the rows up as they stream in and divides. Seeding is k-means++ on a bounded, deterministic sample
(rows whose ``hash(row_id, seed)`` is smallest), so results do not depend on how the data is split into
blocks. Empty clusters are re-seeded with the points farthest from their centroid (one extra pass, only
when it happens). Block outputs are consumed in block order, so sums — and results — are reproducible.

The dataset needs the columns ``row_id`` (int64) and ``embedding`` (fixed_size_list<float32>), as
``EmbeddingSet.dataset()`` provides.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rnb_ray.errors import RnbError
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.embed import EMBEDDING, embeddings_numpy

log = logging.getLogger(__name__)

ROW_ID = "row_id"


@dataclass
class KMeansResult:
    """A fitted clustering. ``centroids`` are float32 (k, d), unit length for metric=cosine."""

    centroids: np.ndarray
    inertia: float
    iterations: int
    converged: bool
    sizes: np.ndarray  # (k,) int64 documents per cluster under ``centroids``
    metric: str = "cosine"
    n: int = 0
    reseeded: int = 0  # empty clusters re-seeded over the run
    history: list[dict[str, float]] = field(default_factory=list)  # per iteration: inertia, shift

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


@contextlib.contextmanager
def ordered_execution(quiet: bool = False) -> Iterator[None]:
    """Ray Data keeps block order while inside (deterministic sums, contiguous row-id ranges).

    ``quiet`` hides Ray Data's progress bars and per-execution log lines: a k-means iteration is a
    sub-second pass, and the one line per iteration we log says more.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    ctx.execution_options.preserve_order = True
    if quiet:
        ctx.enable_progress_bars = False
        data_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = before
        data_log.setLevel(level)


def _block_arrays(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(batch.column(ROW_ID).to_numpy(), dtype=np.int64), embeddings_numpy(batch.column(EMBEDDING)))


def _one_row(obj: Any) -> pa.Table:
    return pa.table({"p": pa.array([pickle.dumps(obj, protocol=5)], pa.large_binary())})


def _stream(ds) -> Iterator[Any]:
    """Unpickle the one-row results of a map_batches pass as they arrive, in block order."""
    with ordered_execution(quiet=True):
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for v in batch.column("p").to_pylist():
                yield pickle.loads(v)


def _partial_fn(batch: pa.Table, C: np.ndarray, metric: str, with_moments: bool) -> pa.Table:
    _, X = _block_arrays(batch)
    return _one_row(km.partial_step(X, C, metric, with_moments))  # type: ignore[arg-type]


def _far_fn(batch: pa.Table, C: np.ndarray, metric: str, m: int) -> pa.Table:
    ids, X = _block_arrays(batch)
    return _one_row(km.farthest_points(X, ids, C, metric, m))  # type: ignore[arg-type]


def _sample_fn(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    ids, _ = _block_arrays(batch)
    u = km.hash_uniform(ids, seed)
    keep = np.flatnonzero(u < fraction)
    out = batch.select([ROW_ID, EMBEDDING]).take(pa.array(keep))
    return out.append_column("u", pa.array(u[keep]))


def _map(ds, fn: Callable, **kwargs: Any):
    with ordered_execution(quiet=True):
        return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow", num_cpus=1)


def sample_embeddings(ds, size: int, seed: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """About ``size`` rows chosen by smallest ``hash(row_id, seed)``: ``(row_ids, X)``, deterministic.

    The driver holds only the sample (bounded by ``size``), never the dataset.
    """
    n = ds.count() if n is None else n
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    fraction = 1.0 if size >= n else min(1.0, (1.25 * size + 32) / n)
    while True:
        parts = []
        with ordered_execution(quiet=True):
            sampled = ds.map_batches(_sample_fn, fn_kwargs={"fraction": fraction, "seed": seed},
                                     batch_size=None, batch_format="pyarrow", num_cpus=1)
            for batch in sampled.iter_batches(batch_size=None, batch_format="pyarrow"):
                if batch.num_rows:
                    parts.append(batch)
        table = pa.concat_tables(parts) if parts else None
        got = 0 if table is None else table.num_rows
        if got >= min(size, n) or fraction >= 1.0:
            break
        fraction = 1.0  # unlucky draw (tiny samples only): take everything
    assert table is not None
    u = table.column("u").to_numpy()
    ids = table.column(ROW_ID).to_numpy()
    order = np.lexsort((ids, u))[:size]
    order = order[np.argsort(ids[order])]
    return ids[order].astype(np.int64), embeddings_numpy(table.column(EMBEDDING).take(pa.array(order)))


def _prepare(ds, materialize: bool):
    """Keep the two columns we need; hold them in the object store across iterations."""
    import ray

    ds = ds.select_columns([ROW_ID, EMBEDDING])
    if not materialize:
        return ds
    with ordered_execution(quiet=True):
        ds = ds.materialize()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if ds.num_blocks() < 2 * cpus and ds.count() >= 4 * cpus:
            ds = ds.repartition(2 * cpus).materialize()  # enough blocks to keep every CPU busy
    return ds


def fit_kmeans(ds, k: int, *, metric: str = "cosine", seed: int = 0, max_iter: int = 100, tol: float = 1e-4,
               sample_size: int = 20_000, init: np.ndarray | None = None, materialize: bool = True,
               verbose: bool = True) -> KMeansResult:
    """Distributed k-means (k-means++ seeding on a sample, then exact Lloyd) over a Ray Dataset.

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
        materialize: keep the embeddings in the Ray object store between iterations (default) instead
            of re-reading them every pass.
        verbose: log one line per iteration (inertia, shift) at INFO.

    Returns:
        KMeansResult with float32 centroids, inertia and sizes under those centroids, iterations,
        whether it converged within ``max_iter``.
    """
    if metric not in km.METRICS:
        raise RnbError(f"unknown metric {metric!r}", fix=f"use one of {', '.join(km.METRICS)}")
    if k < 1:
        raise RnbError(f"k must be at least 1, got {k}", fix="pass --k 2 or more")
    ds = _prepare(ds, materialize)
    n = ds.count()
    if k > n:
        raise RnbError(f"k={k} is greater than the number of non-empty documents ({n})",
                       fix=f"pass --k {max(1, n)} or less, or add documents")
    if init is not None:
        C = np.asarray(init, dtype=np.float64)
        if C.ndim != 2 or C.shape[0] != k:
            raise RnbError(f"init centroids have shape {C.shape}, expected ({k}, d)")
    else:
        _, S = sample_embeddings(ds, max(sample_size, k), seed, n)
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
        total: km.Partial | None = None
        for p in _stream(_map(ds, _partial_fn, C=C, metric=metric, with_moments=tol_abs is None)):
            total = p if total is None else total + p
        assert total is not None
        if tol_abs is None:
            assert total.moments is not None
            tol_abs = km.tolerance(tol, total.moments, total.n)
        sums, counts = total.sums, total.counts
        n_empty = int((counts == 0).sum())
        if n_empty:
            far: list[km.FarPoint] = []
            for block_far in _stream(_map(ds, _far_fn, C=C, metric=metric, m=n_empty)):
                far = sorted(far + block_far)[:n_empty]
            sums, counts, moved = km.reseed_empty(sums, counts, far)
            reseeded += moved
        C_new = km.finalize_centroids(sums, counts, C, metric)  # type: ignore[arg-type]
        shift = float(((C_new - C) ** 2).sum())
        history.append({"iteration": it, "inertia": total.inertia, "shift": shift})
        if verbose:
            log.info("k-means iteration %d: inertia=%.6g shift=%.3g (tol %.3g)%s", it, total.inertia, shift,
                     tol_abs, f", re-seeded {n_empty} empty cluster(s)" if n_empty else "")
        C, last = C_new, total
        if shift <= tol_abs:
            converged = True
            break
    assert last is not None
    if not (converged and history[-1]["shift"] == 0.0):
        # sizes and inertia under the final centroids (Lloyd's last step moved them)
        last = None
        for p in _stream(_map(ds, _partial_fn, C=C, metric=metric, with_moments=False)):
            last = p if last is None else last + p
        assert last is not None
    return KMeansResult(C.astype(np.float32), float(last.inertia), it, converged, last.counts.astype(np.int64),
                        metric, n, reseeded, history)
