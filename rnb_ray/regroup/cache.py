"""The embedding cache: a corpus is embedded once per (corpus, text column, model, settings) and reused.

``embed_corpus(cfg) -> EmbeddingSet`` validates the corpus, embeds it in a Ray Data actor pool (``embed.Embedder``)
and writes ``<cache_dir>/<key>/part-*.parquet`` + ``meta.json`` (format in ARCHITECTURE.md), or reuses the
entry with the same key. ``CacheLookup`` reads the embeddings of row-id ranges back (regroup's writer joins
them to the corpus without a shuffle). The cache's columns are ``EMB_ROW_ID`` (the corpus row id) and
``EMBEDDING``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rnb_ray.atomic import atomic_dir
from rnb_ray.corpus import FILE_SHIFT, REPLACED, ROW_ID, Corpus, open_corpus
from rnb_ray.errors import RnbError
from rnb_ray.ray_env import ordered_execution, require_resources, rnb_errors_from_ray
from rnb_ray.regroup import backends
from rnb_ray.regroup.config import RegroupConfig
from rnb_ray.regroup.embed import (
    EMB_ROW_ID,
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
    backend: str = "torch"  # --embed-backend the embeddings were made with
    precision: str = "fp32"
    backend_model: dict[str, Any] | None = None  # the derived model used (backends.BackendModel.record())

    def files(self) -> list[str]:
        return [str(self.path / p.file) for p in self.parts]

    def dataset(self):
        """Ray Dataset with columns ``row_id`` (``EMB_ROW_ID``, int64) and ``embedding`` (fixed_size_list<float32>)."""
        import ray.data

        if not self.parts:
            raise RnbError("no embeddings to read", where=str(self.path))
        return ray.data.read_parquet(self.files(), columns=[EMB_ROW_ID, EMBEDDING])


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


def corpus_for(cfg: RegroupConfig) -> Corpus:
    input_path, domain_column = resolve_input(cfg)
    return open_corpus(input_path, cfg.text_column, domain_column)


def cache_key(corpus: Corpus, model: ModelRef, max_seq_length: int | None, backend: str = "torch",
              precision: str = "fp32") -> tuple[str, dict]:
    """The entry's key and the settings it hashes. The backend enters only when it is not torch in fp32
    (``backends.backend_settings``), so entries written before backends existed keep their keys."""
    settings = {
        "version": CACHE_VERSION,
        "corpus": {"format": corpus.format, "files": [list(f) for f in corpus.fingerprint]},
        "text_column": corpus.text_column,
        **embedding_settings(model, max_seq_length),
        **backends.backend_settings(backend, precision),
    }
    return settings_key(settings), settings


def pool_size(cfg: RegroupConfig | Any, cluster: dict[str, float]) -> int:
    """Actors in the embedding pool: ``embed_actors``, else as many as the CPUs (and, with GPUs, the GPUs) fit."""
    if cfg.embed_actors:
        return cfg.embed_actors
    actors = max(1, int(cluster.get("CPU", 1)) // cfg.embed_threads)
    if cfg.embed_gpus > 0:
        actors = min(actors, max(1, int(cluster.get("GPU", 0.0) / cfg.embed_gpus + 1e-9)))
    return actors


def require_embedding_gpus(cfg: RegroupConfig | Any, actors: int) -> None:
    """With ``embed_gpus``: fail at once (not a Ray Data pool waiting forever) on a cluster without the GPUs."""
    if cfg.embed_gpus > 0:
        require_resources(gpus=actors * cfg.embed_gpus, what=f"embedding ({actors} actor(s) × {cfg.embed_gpus:g} GPU)",
                          gpu_fix="drop --embed-gpus (embed on CPU), or run on a cluster with GPU nodes")


def require_embedding_cpus(cfg: RegroupConfig | Any, actors: int) -> None:
    require_resources(cpus=actors * cfg.embed_threads, what=f"embedding ({actors} actor(s) × {cfg.embed_threads} CPU)")


def embedder_args(model: ModelRef, bm: backends.BackendModel, cfg: RegroupConfig | Any, text_column: str,
                  max_seq_length: int | None) -> dict[str, Any]:
    """``Embedder``'s constructor arguments for these settings (regroup and assign build the same pool)."""
    kwargs: dict[str, Any] = {"model_path": model.path, "text_column": text_column, "threads": cfg.embed_threads,
                              "batch_size": cfg.embed_batch_size, "max_seq_length": max_seq_length}
    if bm.backend != "torch":
        kwargs.update(backend=bm.backend, backend_path=bm.path)
    if cfg.embed_gpus > 0:
        kwargs.update(device="cuda", precision=cfg.embed_precision)
    return kwargs


def gpu_args(cfg: RegroupConfig | Any) -> dict[str, Any]:
    """``map_batches``' GPU request (none on CPU, so the torch CPU path calls Ray exactly as before)."""
    return {"num_gpus": cfg.embed_gpus} if cfg.embed_gpus > 0 else {}


def _write_cache_part(batch: pa.Table, directory: str) -> pa.Table:
    """Write one cache part (non-empty rows only) and return its stats as one row."""
    empty = batch.column(EMPTY).to_numpy(zero_copy_only=False)
    replaced = int(np.count_nonzero(batch.column(REPLACED).to_numpy(zero_copy_only=False)))
    keep = batch.filter(pa.array(~empty)).select([ROW_ID, EMBEDDING]).rename_columns([EMB_ROW_ID, EMBEDDING])
    ids = batch.column(ROW_ID).to_numpy()
    stats: dict[str, Any] = {"rows_read": batch.num_rows, "empty": int(empty.sum()), "replaced": replaced,
                             "file": None, "rows": keep.num_rows, "min": None, "max": None}
    if keep.num_rows:
        keep = keep.sort_by(EMB_ROW_ID)
        kid = keep.column(EMB_ROW_ID).to_numpy()
        name = f"part-{int(ids.min()):020d}.parquet"
        pq.write_table(keep, os.path.join(directory, name), row_group_size=CACHE_ROW_GROUP)
        stats.update(file=name, min=int(kid[0]), max=int(kid[-1]))
    return pa.table({"stats": [json.dumps(stats)]})


def embed_corpus(cfg: RegroupConfig) -> EmbeddingSet:
    """Validate and embed the corpus of ``cfg``, or reuse its cache entry. Needs Ray initialised.

    The cache entry is ``<cache_dir>/<key>/part-*.parquet`` (``row_id`` int64 in input order,
    ``embedding`` fixed_size_list<float32>[dim], L2-normalised) plus ``meta.json``; the key hashes the
    corpus fingerprint (paths, sizes, mtimes), text column, model (name and files) and max_seq_length.
    Batch size, actor counts and GPUs do not change the key (they do not change the embeddings); the backend
    (``--embed-backend``) and a precision other than fp32 do. A backend other than torch is made ready first
    (``backends.prepare``: ONNX export / static distillation, once, on the driver).

    Raises RnbError for bad input before any Ray work, and when every text is empty.
    """
    import ray
    from ray.data import ActorPoolStrategy

    cfg.validate()
    backends.require_packages(cfg.embed_backend)
    corpus = corpus_for(cfg)
    model = resolve_model(cfg.model)
    actors = pool_size(cfg, ray.cluster_resources())
    require_embedding_gpus(cfg, actors)  # a GPU asked of a cluster without one fails here, at once
    key, settings = cache_key(corpus, model, cfg.max_seq_length, cfg.embed_backend, cfg.embed_precision)
    cache_root = cfg.resolved_cache_dir()
    entry = cache_root / key
    if (entry / "meta.json").exists():
        emb = _load_entry(entry, corpus, cache_hit=True)
        if emb.backend != "torch":  # the key has the model's fingerprint (file sizes); the record has its content
            backends.check_made_from(emb.backend_model, model, where=str(entry))
        log.info("embedding cache hit: %s (%d documents, dim %d)", entry, emb.n, emb.dim)
        _check_nonempty(emb, corpus)
        return emb

    require_embedding_cpus(cfg, actors)
    # ONNX export / static distillation: once, here on the driver, before any actor starts
    bm = backends.prepare(model, cfg.embed_backend, cache_root / "models")
    log.info("embedding %s with %s (%s%s): %d actor(s) × %d thread(s)%s, batch %d → %s", corpus.input, model.name,
             cfg.embed_backend, f", {cfg.embed_precision}" if cfg.embed_precision != "fp32" else "", actors,
             cfg.embed_threads, f" × {cfg.embed_gpus:g} GPU" if cfg.embed_gpus > 0 else "", cfg.embed_batch_size,
             entry)
    t0 = time.perf_counter()
    # if_exists="keep": a concurrent run that filled the same entry first wins (same key, same embeddings)
    with atomic_dir(entry, if_exists="keep") as tmp:
        totals = {"rows_read": 0, "empty": 0, "replaced": 0, "rows": 0}
        parts: list[CachePart] = []
        with rnb_errors_from_ray(), ordered_execution():
            ds = corpus.dataset(columns=[corpus.text_column])
            ds = ds.map_batches(
                Embedder,
                fn_constructor_kwargs=embedder_args(model, bm, cfg, corpus.text_column, cfg.max_seq_length),
                compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                num_cpus=cfg.embed_threads,
                batch_size=cfg.embed_batch_size,
                batch_format="pyarrow",
                **gpu_args(cfg),
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
            "embed_backend": cfg.embed_backend, "embed_precision": cfg.embed_precision,
            "backend_model": bm.record(),
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
                        meta["seconds"], meta.get("embed_backend", "torch"), meta.get("embed_precision", "fp32"),
                        meta.get("backend_model"))


def _check_nonempty(emb: EmbeddingSet, corpus: Corpus) -> None:
    if emb.n == 0:
        raise RnbError(
            f"every text in column {corpus.text_column!r} of {corpus.input} is empty or whitespace "
            f"({emb.n_rows} rows)",
            where=f"{corpus.input}:{corpus.text_column}",
            fix="check --text-column, or the corpus content",
        )


class CacheLookup:
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
                tables.append(pq.read_table(os.path.join(self.directory, self.files[i]),
                                            columns=[EMB_ROW_ID, EMBEDDING],
                                            filters=[(EMB_ROW_ID, ">=", lo), (EMB_ROW_ID, "<=", hi)]))
        if not tables:
            return found, np.zeros((0, 0), np.float32)
        t = pa.concat_tables(tables).sort_by(EMB_ROW_ID)
        cache_ids = t.column(EMB_ROW_ID).to_numpy()
        pos = np.minimum(np.searchsorted(cache_ids, ids), len(cache_ids) - 1)
        found = cache_ids[pos] == ids
        E = embeddings_numpy(t.column(EMBEDDING))
        return found, E[pos[found]]
