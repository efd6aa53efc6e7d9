"""``regroup(cfg)``: read → embed (cached) → k-means → write the corpus split into domains.

The three steps are public so that the sweep can embed once and cluster many times:

* ``embed_corpus(cfg) -> EmbeddingSet`` (in ``cache.py``, imported here too) — validate the corpus, embed
  it in a Ray Data actor pool, or reuse the cache entry for the same corpus, text column, model and settings;
* ``fit_kmeans(emb.dataset(), k, ...)`` (in ``distributed.py``; ``clustering.fit_array`` is the same fit on an
  in-memory array);
* ``write_regrouped(cfg, emb, km) -> Path`` — the output directory of ARCHITECTURE.md, written to a
  temporary directory and moved into place at the end.

Nothing here collects the corpus on the driver: embedding, clustering and writing are streaming Ray
Data passes whose per-block results are a few numbers (plus k × representatives texts).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rnb_ray import storage
from rnb_ray.config import to_dict
from rnb_ray.corpus import INTERNAL_COLUMNS, ROW_ID, Corpus
from rnb_ray.errors import RnbError
from rnb_ray.outputs import atomic_output, check_output_dir, domain_dir, ensure_dir
from rnb_ray.ray_env import ordered_execution, rnb_errors_from_ray
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.backends import require_packages
from rnb_ray.regroup.cache import CacheLookup, EmbeddingSet, corpus_for, embed_corpus
from rnb_ray.regroup.clustering import KMeansResult
from rnb_ray.regroup.config import RegroupConfig
from rnb_ray.regroup.distributed import fit_kmeans, kmeans_device
from rnb_ray.regroup.embed import resolve_model

__all__ = ["RegroupResult", "embed_corpus", "regroup", "validate", "write_regrouped"]

log = logging.getLogger(__name__)

WRITE_BATCH_ROWS = 65_536  # corpus rows per output write call (files are split by domain)
DOMAIN = "domain"
RENAMED_DOMAIN = "domain_original"


# --------------------------------------------------------------------------------------------------
# Writing the regrouped corpus.


def write_domain_parts(out: pa.Table, labels: np.ndarray, data_dir: str, name: str, filesystem: Any = None) -> None:
    """``data_dir/domain-<d>/<name>`` for every domain in ``labels``: locally, or in ``filesystem``
    (:func:`rnb_ray.outputs.domain_dir`: the ``domain`` column is in the file, the directory is not hive)."""
    for d in np.unique(labels):
        sub = out.filter(pa.array(labels == d))
        if filesystem is None:
            target = os.path.join(data_dir, domain_dir(int(d)))
            os.makedirs(target, exist_ok=True)
            pq.write_table(sub, os.path.join(target, name))
        else:  # object store: no directories to make
            pq.write_table(sub, f"{data_dir}/{domain_dir(int(d))}/{name}", filesystem=filesystem)


def _label_and_write(batch: pa.Table, *, data_dir: str, cache_dir: str, parts: list[tuple[str, int, int]],
                     centroids: np.ndarray, metric: str, text_column: str, domain_column: str | None,
                     representatives: int, filesystem: Any = None) -> pa.Table:
    """Label one batch of corpus rows with their nearest centroid and write it, one file per domain."""
    ids = batch.column(ROW_ID).to_numpy()
    found, E = CacheLookup(cache_dir, parts).get(ids)
    kept = batch.filter(pa.array(found))
    kept_ids = ids[found]
    labels, dist = km.assign(E, centroids, metric) if len(E) else (np.zeros(0, np.int64), np.zeros(0))
    k = len(centroids)
    stats: dict[str, Any] = {"rows": int(found.sum()), "dropped": int((~found).sum()),
                             "sizes": np.bincount(labels, minlength=k).tolist(), "crosstab": {}, "reps": {}}
    if domain_column is not None and kept.num_rows:
        orig = kept.column(domain_column).to_pylist()
        ct: dict[str, dict[int, int]] = {}
        for o, d in zip(orig, labels.tolist(), strict=True):
            key = "null" if o is None else str(o)
            row = ct.setdefault(key, {})
            row[d] = row.get(d, 0) + 1
        stats["crosstab"] = ct
    if representatives and kept.num_rows:
        texts = kept.column(text_column)
        for d in np.unique(labels):
            idx = np.flatnonzero(labels == d)
            best = idx[np.lexsort((kept_ids[idx], dist[idx]))[:representatives]]
            stats["reps"][int(d)] = [(float(dist[i]), int(kept_ids[i]), texts[int(i)].as_py()) for i in best]
    out = kept.drop_columns([c for c in INTERNAL_COLUMNS if c in kept.column_names])
    if DOMAIN in out.column_names:
        out = out.rename_columns([RENAMED_DOMAIN if c == DOMAIN else c for c in out.column_names])
    out = out.append_column(DOMAIN, pa.array(labels, pa.int64()))
    write_domain_parts(out, labels, data_dir, f"part-{int(ids.min()):020d}.parquet", filesystem)
    return pa.table({"stats": pa.array([pickle.dumps(stats)], pa.large_binary())})


@dataclass
class WriteStats:
    rows: int = 0
    dropped: int = 0
    sizes: np.ndarray | None = None
    crosstab: dict[str, dict[int, int]] = field(default_factory=dict)
    reps: dict[int, list[tuple[float, int, str]]] = field(default_factory=dict)

    def add(self, s: dict[str, Any], r: int) -> None:
        self.rows += s["rows"]
        self.dropped += s["dropped"]
        sizes = np.asarray(s["sizes"], dtype=np.int64)
        self.sizes = sizes if self.sizes is None else self.sizes + sizes
        for o, row in s["crosstab"].items():
            mine = self.crosstab.setdefault(o, {})
            for d, c in row.items():
                mine[d] = mine.get(d, 0) + c
        for d, cands in s["reps"].items():
            self.reps[d] = sorted(self.reps.get(d, []) + [tuple(c) for c in cands])[:r]


def label_and_write(corpus: Corpus, emb: EmbeddingSet, centroids: np.ndarray, metric: str, data_dir: Path | str,
                    representatives: int, filesystem: Any = None) -> WriteStats:
    """Stream the corpus through nearest-centroid labelling into ``data_dir/domain-<id>/``.

    ``filesystem``: None for a local ``data_dir``, else the pyarrow filesystem it is in (pickled into the tasks).
    """
    ensure_dir(filesystem, str(data_dir))
    parts = [(p.file, p.min_row_id, p.max_row_id) for p in emb.parts]
    stats = WriteStats()
    with rnb_errors_from_ray(), ordered_execution():
        ds = corpus.dataset().map_batches(
            _label_and_write,
            fn_kwargs={"data_dir": str(data_dir), "cache_dir": str(emb.path), "parts": parts,
                       "centroids": np.asarray(centroids, dtype=np.float64), "metric": metric,
                       "text_column": corpus.text_column, "domain_column": corpus.domain_column,
                       "representatives": representatives, "filesystem": filesystem},
            batch_size=WRITE_BATCH_ROWS, batch_format="pyarrow", num_cpus=1,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for blob in batch.column("stats").to_pylist():
                stats.add(pickle.loads(blob), representatives)
    return stats


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def domains_document(cfg: RegroupConfig, emb: EmbeddingSet, kmr: KMeansResult, stats: WriteStats) -> dict:
    """The ``domains.json`` content (ARCHITECTURE.md)."""
    k = kmr.k
    sizes = stats.sizes if stats.sizes is not None else np.zeros(k, np.int64)
    crosstab = None
    if emb.corpus.domain_column is not None:
        crosstab = {o: {str(d): c for d, c in sorted(row.items())} for o, row in sorted(stats.crosstab.items())}
    return _json_safe({
        "k": k,
        "model": emb.model,
        "metric": kmr.metric,
        "dim": emb.dim,
        "n_documents": int(sizes.sum()),
        "n_dropped_empty": emb.n_dropped_empty,
        "n_replaced_utf8": emb.n_replaced_utf8,
        "sizes": {str(d): int(sizes[d]) for d in range(k)},
        "centroids": "centroids.npy",
        "inertia": kmr.inertia,
        "iterations": kmr.iterations,
        "converged": kmr.converged,
        "text_column": emb.corpus.text_column,
        "domain_column": emb.corpus.domain_column,
        "domains": [
            {"id": d, "size": int(sizes[d]),
             "representatives": [text for _, _, text in stats.reps.get(d, [])]}
            for d in range(k)
        ],
        "crosstab": crosstab,
        "embeddings": str(emb.path),
        "input": emb.corpus.input,
        "model_path": resolve_model(cfg.model).path,
        "max_seq_length": cfg.max_seq_length,
        "seed": cfg.seed,
        "embed_backend": emb.backend,
        "embed_precision": emb.precision,
        "backend_model": emb.backend_model,
    })


def write_regrouped(cfg: RegroupConfig, emb: EmbeddingSet, km_result: KMeansResult) -> Path | str:
    """Write the output directory of ``cfg.output`` atomically; returns its path (the URI for object stores).

    Layout (ARCHITECTURE.md): ``data/domain-<id>/part-*.parquet`` (every input column plus ``domain``
    int64; an input column already named ``domain`` is kept as ``domain_original``), ``domains.json``,
    ``centroids.npy`` (float32 (k, d)), ``config.json``. ``domains.json`` is written last.
    """
    with atomic_output(cfg.output, cfg.overwrite, marker="domains.json") as tmp:
        stats = label_and_write(emb.corpus, emb, km_result.centroids, km_result.metric, tmp.child("data"),
                                cfg.representatives, tmp.fs)
        if stats.rows != emb.n or stats.dropped != emb.n_dropped_empty:
            raise RnbError(
                f"the embedding cache {emb.path} does not match the corpus ({stats.rows} rows with embeddings "
                f"and {stats.dropped} without, expected {emb.n} and {emb.n_dropped_empty})",
                where=str(emb.path), fix="delete that cache directory and run again",
            )
        tmp.save_npy("centroids.npy", km_result.centroids.astype(np.float32))
        tmp.write_text("config.json", json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
        doc = domains_document(cfg, emb, km_result, stats)
        tmp.write_text("domains.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if storage.is_uri(cfg.output):
        return cfg.output
    return Path(cfg.output).expanduser().absolute()


# --------------------------------------------------------------------------------------------------
# Everything.


@dataclass
class RegroupResult:
    output: Path | str  # the URI (str) for an object-store output
    k: int
    n_documents: int
    sizes: list[int]
    inertia: float
    iterations: int
    converged: bool
    embeddings: Path
    cache_hit: bool
    seconds: dict[str, float]


def validate(cfg: RegroupConfig) -> Corpus:
    """Every check that needs no Ray: settings, output directory, model, corpus. Returns the corpus."""
    cfg.validate()
    require_packages(cfg.embed_backend)
    check_output_dir(cfg.output, cfg.overwrite)
    resolve_model(cfg.model)
    return corpus_for(cfg)


def regroup(cfg: RegroupConfig) -> RegroupResult:
    """Read → embed (cached) → k-means → write. Ray must be initialised (``ray_env.connect``)."""
    corpus = validate(cfg)
    if corpus.num_rows is not None and corpus.num_rows < cfg.k:
        raise RnbError(f"k={cfg.k} is greater than the number of documents ({corpus.num_rows})",
                       where=corpus.input, fix=f"pass --k {max(1, corpus.num_rows)} or less")
    kmeans_on = kmeans_device(cfg.kmeans_device)  # a GPU asked for and missing fails before the embedding
    t0 = time.perf_counter()
    emb = embed_corpus(cfg)
    if cfg.k > emb.n:
        raise RnbError(f"k={cfg.k} is greater than the number of non-empty documents ({emb.n})",
                       where=f"{corpus.input}:{corpus.text_column}", fix=f"pass --k {emb.n} or less")
    t1 = time.perf_counter()
    with rnb_errors_from_ray():
        kmr = fit_kmeans(emb.dataset(), cfg.k, metric=cfg.metric, seed=cfg.seed, max_iter=cfg.max_iter, tol=cfg.tol,
                         sample_size=cfg.seed_sample, engine=cfg.kmeans_engine, device=kmeans_on)
    t2 = time.perf_counter()
    out = write_regrouped(cfg, emb, kmr)
    t3 = time.perf_counter()
    fs, out_path = storage.resolve(out, "--output")
    sizes = json.loads(storage.read_bytes(fs, out_path + "/domains.json").decode("utf-8"))["sizes"]
    result = RegroupResult(out, cfg.k, sum(sizes.values()), [sizes[str(d)] for d in range(cfg.k)], kmr.inertia,
                           kmr.iterations, kmr.converged, emb.path, emb.cache_hit,
                           {"embed": t1 - t0, "kmeans": t2 - t1, "write": t3 - t2})
    log.info("wrote %d documents in %d domains to %s (embed %.1fs%s, k-means %.1fs / %d iterations, write %.1fs)",
             result.n_documents, cfg.k, out, t1 - t0, " cached" if emb.cache_hit else "", t2 - t1,
             kmr.iterations, t3 - t2)
    return result
