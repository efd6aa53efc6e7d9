"""``regroup(cfg)``: read → embed (cached) → k-means → write the corpus split into domains.

The three steps are public so that the sweep can embed once and cluster many times:

* ``embed_corpus(cfg) -> EmbeddingSet`` — validate the corpus, embed it in a Ray Data actor pool, or
  reuse the cache entry for the same corpus, text column, model and settings;
* ``fit_kmeans(emb.dataset(), k, ...)`` (in ``distributed.py``);
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rnb_ray import storage
from rnb_ray.atomic import atomic_dir
from rnb_ray.config import to_dict
from rnb_ray.corpus import FILE_SHIFT, INTERNAL_COLUMNS, REPLACED, ROW_ID, Corpus, open_corpus
from rnb_ray.errors import RnbError
from rnb_ray.outputs import atomic_output, check_output_dir, ensure_dir
from rnb_ray.ray_env import ordered_execution, require_resources, rnb_errors_from_ray
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.config import RegroupConfig
from rnb_ray.regroup.distributed import KMeansResult, fit_kmeans
from rnb_ray.regroup.embed import (
    EMBEDDING,
    EMPTY,
    Embedder,
    ModelRef,
    embedding_settings,
    embeddings_numpy,
    resolve_model,
    settings_key,
)
from rnb_ray.sample import write_sample_corpus

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_PART_ROWS = 50_000  # rows per embedding cache file
CACHE_ROW_GROUP = 4_096  # small row groups: the writer reads row-id ranges of a part
WRITE_BATCH_ROWS = 65_536  # corpus rows per output write call (files are split by domain)
DOMAIN = "domain"
RENAMED_DOMAIN = "domain_original"


# --------------------------------------------------------------------------------------------------
# Embedding (cached).


@dataclass(frozen=True)
class CachePart:
    file: str
    rows: int
    min_row_id: int
    max_row_id: int


@dataclass(frozen=True)
class EmbeddingSet:
    """Embeddings of a corpus's non-empty documents, in a cache directory (row_id, embedding)."""

    path: Path
    key: str
    n: int  # documents embedded (non-empty)
    dim: int
    n_rows: int  # rows read, empty ones included
    n_dropped_empty: int
    n_replaced_utf8: int
    model: str
    text_column: str
    parts: tuple[CachePart, ...]
    corpus: Corpus = field(repr=False)
    cache_hit: bool = False
    seconds: float = 0.0

    def files(self) -> list[str]:
        return [str(self.path / p.file) for p in self.parts]

    def dataset(self):
        """Ray Dataset with columns ``row_id`` (int64) and ``embedding`` (fixed_size_list<float32>)."""
        import ray.data

        if not self.parts:
            raise RnbError("no embeddings to read", where=str(self.path))
        return ray.data.read_parquet(self.files(), columns=["row_id", EMBEDDING])


def resolve_input(cfg: RegroupConfig) -> tuple[str, str | None]:
    """The corpus path and domain column; with no input, the embedded standard-library corpus."""
    if cfg.input is not None:
        return cfg.input, cfg.domain_column
    path = cfg.resolved_cache_dir() / f"sample-corpus-py{sys.version_info.major}.{sys.version_info.minor}" \
        / "sample.parquet"
    if not path.exists():
        log.info("no --input given: writing the embedded sample corpus (stdlib docstrings) to %s", path)
        write_sample_corpus(path)
    return str(path), cfg.domain_column or "source"


def _corpus_for(cfg: RegroupConfig) -> Corpus:
    input_path, domain_column = resolve_input(cfg)
    return open_corpus(input_path, cfg.text_column, domain_column)


def cache_key(corpus: Corpus, model: ModelRef, max_seq_length: int | None) -> tuple[str, dict]:
    settings = {
        "version": CACHE_VERSION,
        "corpus": {"format": corpus.format, "files": [list(f) for f in corpus.fingerprint]},
        "text_column": corpus.text_column,
        **embedding_settings(model, max_seq_length),
    }
    return settings_key(settings), settings


def _write_cache_part(batch: pa.Table, directory: str) -> pa.Table:
    """Write one cache part (non-empty rows only) and return its stats as one row."""
    empty = batch.column(EMPTY).to_numpy(zero_copy_only=False)
    replaced = int(np.count_nonzero(batch.column(REPLACED).to_numpy(zero_copy_only=False)))
    keep = batch.filter(pa.array(~empty)).select([ROW_ID, EMBEDDING]).rename_columns(["row_id", EMBEDDING])
    ids = batch.column(ROW_ID).to_numpy()
    stats: dict[str, Any] = {"rows_read": batch.num_rows, "empty": int(empty.sum()), "replaced": replaced,
                             "file": None, "rows": keep.num_rows, "min": None, "max": None}
    if keep.num_rows:
        keep = keep.sort_by("row_id")
        kid = keep.column("row_id").to_numpy()
        name = f"part-{int(ids.min()):020d}.parquet"
        pq.write_table(keep, os.path.join(directory, name), row_group_size=CACHE_ROW_GROUP)
        stats.update(file=name, min=int(kid[0]), max=int(kid[-1]))
    return pa.table({"stats": [json.dumps(stats)]})


def embed_corpus(cfg: RegroupConfig) -> EmbeddingSet:
    """Validate and embed the corpus of ``cfg``, or reuse its cache entry. Needs Ray initialised.

    The cache entry is ``<cache_dir>/<key>/part-*.parquet`` (``row_id`` int64 in input order,
    ``embedding`` fixed_size_list<float32>[dim], L2-normalised) plus ``meta.json``; the key hashes the
    corpus fingerprint (paths, sizes, mtimes), text column, model (name and files) and max_seq_length.
    Batch size and actor counts do not change the key (they do not change the embeddings).

    Raises RnbError for bad input before any Ray work, and when every text is empty.
    """
    import ray
    from ray.data import ActorPoolStrategy

    cfg.validate()
    corpus = _corpus_for(cfg)
    model = resolve_model(cfg.model)
    key, settings = cache_key(corpus, model, cfg.max_seq_length)
    cache_root = cfg.resolved_cache_dir()
    entry = cache_root / key
    if (entry / "meta.json").exists():
        emb = _load_entry(entry, corpus, cache_hit=True)
        log.info("embedding cache hit: %s (%d documents, dim %d)", entry, emb.n, emb.dim)
        _check_nonempty(emb, corpus)
        return emb

    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = cfg.embed_actors or max(1, cpus // cfg.embed_threads)
    require_resources(cpus=actors * cfg.embed_threads, what=f"embedding ({actors} actor(s) × {cfg.embed_threads} CPU)")
    log.info("embedding %s with %s: %d actor(s) × %d thread(s), batch %d → %s", corpus.input, model.name, actors,
             cfg.embed_threads, cfg.embed_batch_size, entry)
    t0 = time.perf_counter()
    # if_exists="keep": a concurrent run that filled the same entry first wins (same key, same embeddings)
    with atomic_dir(entry, if_exists="keep") as tmp:
        totals = {"rows_read": 0, "empty": 0, "replaced": 0, "rows": 0}
        parts: list[CachePart] = []
        with rnb_errors_from_ray(), ordered_execution():
            ds = corpus.dataset(columns=[corpus.text_column])
            ds = ds.map_batches(
                Embedder,
                fn_constructor_kwargs={"model_path": model.path, "text_column": corpus.text_column,
                                       "threads": cfg.embed_threads, "batch_size": cfg.embed_batch_size,
                                       "max_seq_length": cfg.max_seq_length},
                compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                num_cpus=cfg.embed_threads,
                batch_size=cfg.embed_batch_size,
                batch_format="pyarrow",
            )
            ds = ds.map_batches(_write_cache_part, fn_kwargs={"directory": str(tmp)}, batch_size=CACHE_PART_ROWS,
                                batch_format="pyarrow", num_cpus=0)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for s in map(json.loads, batch.column("stats").to_pylist()):
                    for name in totals:
                        totals[name] += s[name]
                    if s["file"]:
                        parts.append(CachePart(s["file"], s["rows"], s["min"], s["max"]))
        dim = 0
        if parts:
            dim = pq.read_schema(tmp / parts[0].file).field(EMBEDDING).type.list_size
        parts.sort(key=lambda p: p.min_row_id)
        seconds = time.perf_counter() - t0
        meta = {
            "version": CACHE_VERSION, "key": key, "settings": settings, "model": model.name, "model_path": model.path,
            "input": corpus.input, "text_column": corpus.text_column, "dim": dim, "n": totals["rows"],
            "n_rows": totals["rows_read"], "n_dropped_empty": totals["empty"],
            "n_replaced_utf8": totals["replaced"], "seconds": seconds,
            "parts": [p.__dict__ for p in parts],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    emb = _load_entry(entry, corpus, cache_hit=False)
    log.info("embedded %d documents in %.1fs (%d empty dropped, %d with invalid UTF-8 replaced)", emb.n,
             emb.seconds, emb.n_dropped_empty, emb.n_replaced_utf8)
    _check_nonempty(emb, corpus)
    return emb


def _load_entry(entry: Path, corpus: Corpus, cache_hit: bool) -> EmbeddingSet:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    parts = tuple(CachePart(**p) for p in meta["parts"])
    return EmbeddingSet(entry, meta["key"], meta["n"], meta["dim"], meta["n_rows"], meta["n_dropped_empty"],
                        meta["n_replaced_utf8"], meta["model"], meta["text_column"], parts, corpus, cache_hit,
                        meta["seconds"])


def _check_nonempty(emb: EmbeddingSet, corpus: Corpus) -> None:
    if emb.n == 0:
        raise RnbError(
            f"every text in column {corpus.text_column!r} of {corpus.input} is empty or whitespace "
            f"({emb.n_rows} rows)",
            where=f"{corpus.input}:{corpus.text_column}",
            fix="check --text-column, or the corpus content",
        )


# --------------------------------------------------------------------------------------------------
# Writing the regrouped corpus.


class _CacheLookup:
    """Embeddings for row-id ranges, read from the cache parts that overlap them."""

    def __init__(self, directory: str, parts: list[tuple[str, int, int]]):
        self.directory = directory
        self.files = [p[0] for p in parts]
        self.mins = np.array([p[1] for p in parts], dtype=np.int64)
        self.maxs = np.array([p[2] for p in parts], dtype=np.int64)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found mask, embeddings of the found rows in the order of ids)``."""
        found = np.zeros(len(ids), dtype=bool)
        if not len(ids):
            return found, np.zeros((0, 0), np.float32)
        tables = []
        files = ids >> FILE_SHIFT
        for f in np.unique(files):  # one contiguous run per input file
            run = ids[files == f]
            lo, hi = int(run.min()), int(run.max())
            for i in np.flatnonzero((self.mins <= hi) & (self.maxs >= lo)):
                tables.append(pq.read_table(os.path.join(self.directory, self.files[i]), columns=["row_id", EMBEDDING],
                                            filters=[("row_id", ">=", lo), ("row_id", "<=", hi)]))
        if not tables:
            return found, np.zeros((0, 0), np.float32)
        t = pa.concat_tables(tables).sort_by("row_id")
        cache_ids = t.column("row_id").to_numpy()
        pos = np.minimum(np.searchsorted(cache_ids, ids), len(cache_ids) - 1)
        found = cache_ids[pos] == ids
        E = embeddings_numpy(t.column(EMBEDDING))
        return found, E[pos[found]]


def write_domain_parts(out: pa.Table, labels: np.ndarray, data_dir: str, name: str, filesystem: Any = None) -> None:
    """``data_dir/domain=<d>/<name>`` for every domain in ``labels``: locally, or in ``filesystem``."""
    for d in np.unique(labels):
        sub = out.filter(pa.array(labels == d))
        if filesystem is None:
            target = os.path.join(data_dir, f"{DOMAIN}={int(d)}")
            os.makedirs(target, exist_ok=True)
            pq.write_table(sub, os.path.join(target, name))
        else:  # object store: no directories to make
            pq.write_table(sub, f"{data_dir}/{DOMAIN}={int(d)}/{name}", filesystem=filesystem)


def _label_and_write(batch: pa.Table, *, data_dir: str, cache_dir: str, parts: list[tuple[str, int, int]],
                     centroids: np.ndarray, metric: str, text_column: str, domain_column: str | None,
                     representatives: int, filesystem: Any = None) -> pa.Table:
    """Label one batch of corpus rows with their nearest centroid and write it, one file per domain."""
    ids = batch.column(ROW_ID).to_numpy()
    found, E = _CacheLookup(cache_dir, parts).get(ids)
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
    """Stream the corpus through nearest-centroid labelling into ``data_dir/domain=<id>/``.

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
        "seed": cfg.seed,
    })


def write_regrouped(cfg: RegroupConfig, emb: EmbeddingSet, km_result: KMeansResult) -> Path | str:
    """Write the output directory of ``cfg.output`` atomically; returns its path (the URI for object stores).

    Layout (ARCHITECTURE.md): ``data/domain=<id>/part-*.parquet`` (every input column plus ``domain``
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
    check_output_dir(cfg.output, cfg.overwrite)
    resolve_model(cfg.model)
    return _corpus_for(cfg)


def regroup(cfg: RegroupConfig) -> RegroupResult:
    """Read → embed (cached) → k-means → write. Ray must be initialised (``ray_env.connect``)."""
    corpus = validate(cfg)
    if corpus.num_rows is not None and corpus.num_rows < cfg.k:
        raise RnbError(f"k={cfg.k} is greater than the number of documents ({corpus.num_rows})",
                       where=corpus.input, fix=f"pass --k {max(1, corpus.num_rows)} or less")
    t0 = time.perf_counter()
    emb = embed_corpus(cfg)
    if cfg.k > emb.n:
        raise RnbError(f"k={cfg.k} is greater than the number of non-empty documents ({emb.n})",
                       where=f"{corpus.input}:{corpus.text_column}", fix=f"pass --k {emb.n} or less")
    t1 = time.perf_counter()
    with rnb_errors_from_ray():
        kmr = fit_kmeans(emb.dataset(), cfg.k, metric=cfg.metric, seed=cfg.seed, max_iter=cfg.max_iter, tol=cfg.tol,
                         sample_size=cfg.seed_sample, engine=cfg.kmeans_engine)
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
