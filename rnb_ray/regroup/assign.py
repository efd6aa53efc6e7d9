"""``assign``: give new documents the domains of an earlier regroup (nearest training centroid).

The paper assigns evaluation data to the *training* centroids rather than clustering it separately (a
cluster without training data could not be sampled). Documents are embedded with the regroup's model and
embedding backend (``domains.json``'s ``embed_backend``; another backend would put them in another vector
space, so it is refused), in the same Ray Data actor pool, and written like the regroup output:

    OUT/data/domain-<id>/part-*.parquet   every input column + ``domain`` (int64)
    OUT/assignment.json                   {"domains", "input", "k", "n_documents", "n_dropped_empty",
                                           "n_replaced_utf8", "sizes": {"<id>": n}}

Empty texts are dropped and counted, as in regroup.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from rnb_ray import storage
from rnb_ray.corpus import INTERNAL_COLUMNS, REPLACED, ROW_ID, open_corpus
from rnb_ray.errors import RnbError
from rnb_ray.outputs import atomic_output, check_output_dir
from rnb_ray.ray_env import ordered_execution, rnb_errors_from_ray
from rnb_ray.regroup import backends
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.cache import (
    embedder_args,
    gpu_args,
    pool_size,
    require_embedding_cpus,
    require_embedding_gpus,
)
from rnb_ray.regroup.config import AssignConfig, check_embed_backend
from rnb_ray.regroup.embed import EMBEDDING, EMPTY, Embedder, ModelRef, embeddings_numpy, resolve_model
from rnb_ray.regroup.regroup import DOMAIN, RENAMED_DOMAIN, WRITE_BATCH_ROWS, write_domain_parts

_REQUIRED = ("k", "model", "metric", "centroids", "text_column")


def _load_domains_uri(uri: str) -> tuple[dict, np.ndarray]:
    """domains.json and centroids.npy from an object store (``rnb regroup --output s3://...``)."""
    fs, path = storage.resolve(uri, "--domains")
    shown = storage.strip_query(uri)
    storage.require_bucket(fs, path, uri, "domains file")
    if storage.info(fs, path, uri, "domains file").type != pafs.FileType.File:
        raise RnbError(f"domains file {shown} does not exist", where=shown,
                       fix="pass OUT/domains.json of an rnb regroup run")
    try:
        doc = json.loads(storage.read_bytes(fs, path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RnbError(f"domains file {shown} is not valid JSON: {e}", where=shown) from e
    missing = [f for f in _REQUIRED if f not in doc]
    if missing:
        raise RnbError(f"domains file {shown} lacks {', '.join(missing)}", where=shown,
                       fix="pass the domains.json written by rnb regroup")
    cpath = f"{path.rpartition('/')[0]}/{doc['centroids']}"
    if storage.info(fs, cpath, uri, "centroids file").type != pafs.FileType.File:
        raise RnbError(f"centroids file {storage.display_path(fs, cpath)} named by {shown} does not exist",
                       where=storage.display_path(fs, cpath))
    return doc, np.load(io.BytesIO(storage.read_bytes(fs, cpath)))


def load_domains(domains_json: str | Path) -> tuple[dict, np.ndarray]:
    """domains.json and its centroids, checked (a local path, or an object-store URI)."""
    if storage.is_uri(domains_json):
        doc, C = _load_domains_uri(str(domains_json))
        cpath: Path | str = storage.strip_query(str(domains_json)).rpartition("/")[0] + "/" + doc["centroids"]
    else:
        p = Path(domains_json).expanduser()
        if not p.is_file():
            raise RnbError(f"domains file {p} does not exist", where=str(p), fix="pass OUT/domains.json of an rnb regroup run")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RnbError(f"domains file {p} is not valid JSON: {e}", where=str(p)) from e
        missing = [f for f in _REQUIRED if f not in doc]
        if missing:
            raise RnbError(f"domains file {p} lacks {', '.join(missing)}", where=str(p),
                           fix="pass the domains.json written by rnb regroup")
        cpath = p.parent / doc["centroids"]
        if not cpath.is_file():
            raise RnbError(f"centroids file {cpath} named by {p} does not exist", where=str(cpath))
        C = np.load(cpath)
    if C.ndim != 2 or C.shape[0] != doc["k"]:
        raise RnbError(f"centroids {cpath} have shape {C.shape}, expected ({doc['k']}, d)", where=str(cpath))
    return doc, C


def _model_for(doc: dict) -> ModelRef:
    """The regroup's model: its local path when that still exists (e.g. same machine), else its name."""
    path = doc.get("model_path")
    if path and Path(path).is_dir():
        return ModelRef(doc["model"], path)
    if doc["model"] == resolve_model(None).name:
        return resolve_model(None)  # the bundled default, wherever this install put it
    return resolve_model(doc["model"])


def assign_backend(doc: dict, asked: str | None, domains_json: str | Path) -> str:
    """The regroup's embedding backend (torch for a domains.json written before backends existed); refuses
    another one: its vectors would not be in the space the centroids live in."""
    used = doc.get("embed_backend") or "torch"
    if asked is not None and asked != used:
        raise RnbError(f"--embed-backend {asked}, but the regroup of {domains_json} embedded with {used}: documents "
                       "embedded with another backend are not comparable with its centroids",
                       where="--embed-backend", fix=f"drop --embed-backend (assign uses {used}), or regroup again with "
                       f"--embed-backend {asked}")
    return used


def _backend_model(doc: dict, model: ModelRef, backend: str, models_dir: Path) -> backends.BackendModel:
    """The regroup's derived model (ONNX export / static model) when it is still there, else the same one made
    again from the same model into ``models_dir``; the recorded source must be the model found here."""
    if backend == "torch":
        return backends.BackendModel("torch")
    rec = doc.get("backend_model") or {}
    made_from = (rec.get("source") or {}).get("sha256")
    if made_from is not None and made_from != backends.source_record(model)["sha256"]:
        raise RnbError(f"the regroup's {backend} model was made from model {rec['source'].get('name')!r} "
                       f"(sha256 {made_from[:12]}), but the model found now ({model.path}) has other content",
                       where=str(model.path), fix="assign with the regroup's own model files, or regroup again")
    path = rec.get("path")
    if path and (Path(path) / backends.META).is_file():
        return backends.verify(Path(path), backend, model)
    return backends.prepare(model, backend, models_dir)


def validate_assign(domains_json: str | Path, input: str | Path, output: str | Path, *,
                    text_column: str | None = None, overwrite: bool = False, embed_backend: str | None = None,
                    embed_gpus: float = 0.0, embed_precision: str = "fp32"):
    """All checks that need no Ray; returns (domains doc, centroids, corpus, model, backend)."""
    doc, C = load_domains(domains_json)
    backend = assign_backend(doc, embed_backend, domains_json)
    check_embed_backend(backend, embed_gpus, embed_precision)
    backends.require_packages(backend)
    check_output_dir(output, overwrite)
    model = _model_for(doc)
    corpus = open_corpus(input, text_column or doc["text_column"])
    return doc, C, corpus, model, backend


def _assign_write(batch: pa.Table, *, data_dir: str, centroids: np.ndarray, metric: str,
                  filesystem: Any = None) -> pa.Table:
    empty = batch.column(EMPTY).to_numpy(zero_copy_only=False)
    replaced = int(np.count_nonzero(batch.column(REPLACED).to_numpy(zero_copy_only=False)))
    kept = batch.filter(pa.array(~empty))
    ids = batch.column(ROW_ID).to_numpy()
    stats: dict[str, Any] = {"rows": kept.num_rows, "dropped": int(empty.sum()), "replaced": replaced,
                             "sizes": [0] * len(centroids)}
    if kept.num_rows:
        E = embeddings_numpy(kept.column(EMBEDDING))
        labels, _ = km.assign(E, centroids, metric)  # type: ignore[arg-type]
        stats["sizes"] = np.bincount(labels, minlength=len(centroids)).tolist()
        out = kept.drop_columns([c for c in (*INTERNAL_COLUMNS, EMBEDDING, EMPTY) if c in kept.column_names])
        if DOMAIN in out.column_names:
            out = out.rename_columns([RENAMED_DOMAIN if c == DOMAIN else c for c in out.column_names])
        out = out.append_column(DOMAIN, pa.array(labels, pa.int64()))
        write_domain_parts(out, labels, data_dir, f"part-{int(ids.min()):020d}.parquet", filesystem)
    return pa.table({"stats": pa.array([pickle.dumps(stats)], pa.large_binary())})


def assign(domains_json: str | Path, input: str | Path, output: str | Path, *, text_column: str | None = None,
           overwrite: bool = False, embed_batch_size: int = 128, embed_actors: int | None = None,
           embed_threads: int = 1, embed_backend: str | None = None, embed_gpus: float = 0.0,
           embed_precision: str = "fp32", cache_dir: str | None = None) -> dict:
    """Embed ``input`` with the regroup's model and backend and write it with the nearest centroid's ``domain``.

    Args:
        domains_json: ``OUT/domains.json`` of an ``rnb regroup`` run (its ``centroids.npy`` beside it).
        input: parquet/jsonl/csv file or directory.
        output: directory to write (atomically): ``data/domain-<id>/`` and ``assignment.json``.
        text_column: text column of ``input``; default: the regroup's.
        overwrite: replace a non-empty ``output``.
        embed_backend: default (None) the regroup's (``domains.json``); another one is refused.
        embed_gpus, embed_precision: GPUs per embedding actor (torch backend) and fp32/fp16/bf16 on them.
        cache_dir: where the ONNX export / static model is made when the regroup's is gone
            (default ``<parent of output>/.rnb-cache``).

    Returns:
        The ``assignment.json`` content. Ray must be initialised.
    """
    import ray
    from ray.data import ActorPoolStrategy

    cfg = AssignConfig(domains=str(domains_json), input=str(input), output=str(output), text_column=text_column,
                       embed_batch_size=embed_batch_size, embed_actors=embed_actors, embed_threads=embed_threads,
                       embed_backend=embed_backend, embed_gpus=embed_gpus, embed_precision=embed_precision,
                       cache_dir=cache_dir, overwrite=overwrite)
    cfg.validate()
    doc, C, corpus, model, backend = validate_assign(domains_json, input, output, text_column=text_column,
                                                     overwrite=overwrite, embed_backend=embed_backend,
                                                     embed_gpus=embed_gpus, embed_precision=embed_precision)
    actors = pool_size(cfg, ray.cluster_resources())
    require_embedding_gpus(cfg, actors)
    require_embedding_cpus(cfg, actors)
    bm = _backend_model(doc, model, backend, cfg.resolved_cache_dir() / "models")
    totals = {"rows": 0, "dropped": 0, "replaced": 0}
    sizes = np.zeros(len(C), dtype=np.int64)
    with atomic_output(output, overwrite, marker="assignment.json") as tmp:
        with rnb_errors_from_ray(), ordered_execution():
            ds = corpus.dataset().map_batches(
                Embedder,
                fn_constructor_kwargs=embedder_args(model, bm, cfg, corpus.text_column, doc.get("max_seq_length")),
                compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1), num_cpus=embed_threads, batch_size=embed_batch_size,
                batch_format="pyarrow", **gpu_args(cfg),
            ).map_batches(_assign_write, fn_kwargs={"data_dir": tmp.child("data"), "centroids": C.astype(np.float64),
                                                    "metric": doc["metric"], "filesystem": tmp.fs},
                          batch_size=WRITE_BATCH_ROWS, batch_format="pyarrow", num_cpus=0)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for blob in batch.column("stats").to_pylist():
                    s = pickle.loads(blob)
                    for name in totals:
                        totals[name] += s[name]
                    sizes += np.asarray(s["sizes"], dtype=np.int64)
        if totals["rows"] == 0:
            raise RnbError(f"every text in column {corpus.text_column!r} of {input} is empty or whitespace",
                           where=f"{input}:{corpus.text_column}", fix="check --text-column, or the input content")
        domains_ref = domains_json if storage.is_uri(domains_json) else Path(domains_json).expanduser().absolute()
        result = {"domains": str(domains_ref), "input": str(input), "k": int(doc["k"]),
                  "model": doc["model"], "metric": doc["metric"], "text_column": corpus.text_column,
                  "embed_backend": backend,
                  "n_documents": totals["rows"], "n_dropped_empty": totals["dropped"],
                  "n_replaced_utf8": totals["replaced"], "sizes": {str(d): int(sizes[d]) for d in range(len(C))}}
        tmp.write_text("assignment.json", json.dumps(result, indent=2) + "\n")
    return result
