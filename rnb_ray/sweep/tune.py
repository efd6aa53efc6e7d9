"""`rnb sweep`: choose the number of domains k (and λ, strategy) with Ray Tune.

The paper's Algorithm 2 / Fig. 2: for each candidate k, cluster the training embeddings into k domains,
train a short proxy model with stratified sampling over them, and keep the k with the lowest held-out
loss. Here:

1. The corpus is embedded **once** (``regroup.embed_corpus``, cached) and the embeddings, with the texts,
   go into the object store once (``tune.with_parameters``); every trial reads them from there.
2. A fixed held-out set (``HELDOUT_FRACTION`` of the documents, chosen by a hash of the row id, so the
   same documents for every k) is split off. Each trial clusters the *training* embeddings for its k
   in-process with the same pure k-means as the distributed one (``regroup.kmeans``: k-means++ on the
   same deterministic sample, then Lloyd), assigns the held-out documents to the nearest centroid (the
   paper: never cluster the evaluation data separately), and scores the silhouette on a fixed sample.
3. The trial trains a proxy run in-process (``balance.train.run_training_loop``: one worker, no
   TorchTrainer) and reports the held-out loss at every evaluation with ``tune.report``. The reported
   ``eval_loss`` is the loss per held-out *document* (domain losses weighted by the held-out share of
   each domain), so values are comparable across k; a uniform mean over domains would not be.
4. ASHA stops trials whose loss is worse than their peers' at the same step.

Why the clustering runs in-process inside the trial: a trial that launched Ray Data tasks (the
distributed ``fit_kmeans``) would need CPUs beyond the trial's own reservation; on a 2-CPU machine with
one CPU per trial those tasks wait for CPUs that the trials hold, and the sweep stalls. Embeddings of a
corpus a proxy sweep is run on (10⁵–10⁶ documents × 384 floats) fit in a trial's memory; clustering
them in-process costs seconds. On a larger cluster, trials run in parallel (``cpus_per_trial`` each,
``max_concurrent_trials`` at once), so the sweep scales with the number of CPUs/nodes.

Outputs (``OUT``): ``results.csv`` / ``results.json`` (one row per trial: k, λ, strategy, status,
held-out loss, silhouette, inertia, smallest/largest domain, seconds, error), ``best.json``, the
silhouette-vs-loss correlation (in ``results.json``), ``config.json``, ``tune/`` (Ray Tune's experiment
directory: what ``Tuner.restore`` resumes from), ``trials/<k…>/`` (each trial's corpus split, held-out set and
proxy training run directory; on a multi-node cluster OUT must be on storage every node sees) and, with ``write_best``, ``regrouped/`` (the corpus
regrouped at the best k, ready for ``rnb train``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rnb_ray import atomic
from rnb_ray.config import save_config, to_dict
from rnb_ray.errors import RnbError
from rnb_ray.sweep.config import SweepConfig
from rnb_ray.sweep.criteria import (
    TrialRow,
    csv_rows,
    format_table,
    pick_best,
    silhouette_agreement,
    sort_rows,
)

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1
HELDOUT_SALT = 104729  # the held-out choice must not correlate with the k-means seeding sample
SEED_SAMPLE = 20_000  # k-means++ seeding sample, as regroup's default
FAIL_ENV = "RNB_SWEEP_FAIL_K"  # fault injection for tests: comma-separated k values whose trials raise
TRIAL_COLUMNS = ("text", "domain")


# ----------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class SweepData:
    """What every trial needs, put in the object store once."""

    X: np.ndarray  # (n, d) float32 embeddings, input order
    texts: list[str]
    original: list[str] | None  # original domain per document (cross-tab), or None
    heldout: np.ndarray  # (n,) bool


def _load(cfg: SweepConfig, emb: Any) -> SweepData:
    """Embeddings (from the cache) and texts of the embedded documents, aligned by row id."""
    import pyarrow as pa

    from rnb_ray.corpus import ROW_ID
    from rnb_ray.corpus_read import read_fragment
    from rnb_ray.regroup import kmeans as km
    from rnb_ray.regroup.embed import embeddings_numpy

    ids_parts, x_parts = [], []
    for f in emb.files():
        import pyarrow.parquet as pq

        t = pq.read_table(f, columns=["row_id", "embedding"])
        ids_parts.append(t.column("row_id").to_numpy())
        x_parts.append(embeddings_numpy(t.column("embedding")))
    row_ids = np.concatenate(ids_parts)
    X = np.concatenate(x_parts).astype(np.float32, copy=False)
    order = np.argsort(row_ids, kind="stable")
    row_ids, X = row_ids[order], X[order]

    corpus = emb.corpus
    cols = [corpus.text_column] + ([cfg.domain_column] if cfg.domain_column else [])
    tables = [t for frag in corpus.fragments for t in read_fragment(corpus, frag, cols)]
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        raise RnbError(f"{corpus.input} has no rows", where=corpus.input)
    all_ids = table.column(ROW_ID).to_numpy()
    pos = np.searchsorted(all_ids, row_ids)
    if np.any(pos >= len(all_ids)) or np.any(all_ids[np.minimum(pos, len(all_ids) - 1)] != row_ids):
        raise RnbError(f"the embedding cache {emb.path} does not match the corpus {corpus.input}",
                       where=str(emb.path), fix="delete that cache directory and run again")
    texts = table.column(corpus.text_column).take(pa.array(pos)).to_pylist()
    original = None
    if cfg.domain_column:
        original = [str(v) for v in table.column(cfg.domain_column).take(pa.array(pos)).to_pylist()]
    heldout = km.hash_uniform(row_ids, cfg.seed + HELDOUT_SALT) < HELDOUT_FRACTION
    return SweepData(X=X, texts=texts, original=original, heldout=heldout)


# ----------------------------------------------------------------------------------------------- trial
def cluster(X: np.ndarray, k: int, *, metric: str, seed: int, max_iter: int, tol: float = 1e-4
            ) -> tuple[np.ndarray, np.ndarray, float, int]:
    """k-means in-process with regroup's pure steps, seeded like ``distributed.fit_kmeans``.

    Returns (centroids, labels, inertia, iterations).
    """
    from rnb_ray.regroup import kmeans as km

    ids = np.arange(len(X), dtype=np.int64)
    if len(X) > SEED_SAMPLE:
        u = km.hash_uniform(ids, seed)
        S = X[np.sort(np.lexsort((ids, u))[:SEED_SAMPLE])]
    else:
        S = X
    init = km.kmeans_plus_plus(S, k, metric, np.random.default_rng(seed))  # type: ignore[arg-type]
    res = km.lloyd(X, init, metric, max_iter=max_iter, tol=tol)  # type: ignore[arg-type]
    return res.centroids, res.labels, res.inertia, res.iterations


def silhouette(X: np.ndarray, centroids: np.ndarray, metric: str, sample: int, seed: int) -> float | None:
    """Mean silhouette of a fixed sample (the same rows for every k) under nearest-centroid labels."""
    from rnb_ray.regroup import kmeans as km

    ids = np.arange(len(X), dtype=np.int64)
    pick = np.sort(np.lexsort((ids, km.hash_uniform(ids, seed + 7919)))[:sample])
    S = X[pick]
    labels, _ = km.assign(S, centroids, metric)  # type: ignore[arg-type]
    if len(np.unique(labels)) < 2:
        return None
    _, labels = np.unique(labels, return_inverse=True)
    return float(km.silhouette_samples(S, labels, metric).mean())  # type: ignore[arg-type]


def trial_name(k: int, strategy: str, lam: float) -> str:
    return f"k{k}-{strategy}" + (f"-lam{lam:g}" if strategy == "rnb" else "")


def _heldout_loss(by_domain: dict[str, float], q: dict[str, float]) -> float:
    """Loss per held-out document: domain losses weighted by the held-out share of each domain."""
    w = {d: q[d] for d in by_domain if d in q}
    total = sum(w.values())
    if total <= 0:
        return float("nan")
    return sum(by_domain[d] * w[d] for d in w) / total


def _trial(config: dict[str, Any], data: SweepData | None = None, settings: dict[str, Any] | None = None) -> None:
    """One Ray Tune trial: cluster for k, write this trial's corpus, train a proxy run, report."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from ray import tune

    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.train import run_training_loop
    from rnb_ray.config import from_dict
    from rnb_ray.regroup import kmeans as km

    assert data is not None and settings is not None
    k, strategy, lam = int(config["k"]), str(config["setting"]["strategy"]), float(config["setting"]["lam"])
    torch.set_num_threads(max(1, int(settings["cpus_per_trial"])))
    # Our own directory per grid point (not Tune's trial dir: with reused actors and restores that moves).
    trial_dir = Path(settings["trials_dir"]) / trial_name(k, strategy, lam)
    if trial_dir.exists():
        shutil.rmtree(trial_dir)  # a restarted trial starts clean
    trial_dir.mkdir(parents=True)
    t0 = time.perf_counter()

    train_idx = np.flatnonzero(~data.heldout)
    eval_idx = np.flatnonzero(data.heldout)
    C, labels, inertia, iterations = cluster(data.X[train_idx], k, metric=settings["metric"], seed=settings["seed"],
                                             max_iter=settings["max_iter"])
    eval_labels, _ = km.assign(data.X[eval_idx], C, settings["metric"])  # type: ignore[arg-type]
    sizes = np.bincount(labels, minlength=k)
    sil = silhouette(data.X, C, settings["metric"], settings["silhouette_sample"], settings["seed"])
    if k in settings["fail_k"]:
        raise RuntimeError(f"injected failure for k={k} ({FAIL_ENV})")

    def write(idx: np.ndarray, lab: np.ndarray, name: str) -> str:
        cols = {"text": [data.texts[i] for i in idx], "domain": lab.astype(np.int64)}
        if data.original is not None:
            cols["original"] = [data.original[i] for i in idx]
        path = trial_dir / name
        pq.write_table(pa.table(cols), path)
        return str(path)

    train_path = write(train_idx, labels, "train.parquet")
    eval_path = write(eval_idx, eval_labels, "heldout.parquet")
    eval_counts = np.bincount(eval_labels, minlength=k)
    q = {str(d): float(eval_counts[d] / max(1, eval_counts.sum())) for d in range(k)}
    cluster_seconds = time.perf_counter() - t0

    base = dict(settings["train_base"])
    base.update({
        "data": train_path, "eval_data": eval_path, "output": str(trial_dir / "train"),
        "text_column": "text", "domain_column": "domain", "strategy": strategy, "lam": lam,
        "steps": settings["trial_steps"], "eval_every": settings["eval_every"], "workers": 1,
        "seed": settings["seed"], "checkpoint_every": 0,
        "eval_max_per_domain": max(int(base.get("eval_max_per_domain", 64)), int(eval_counts.max())),
    })
    base.setdefault("log_every", settings["eval_every"])
    base.setdefault("update_every", min(10, settings["trial_steps"]))
    tcfg = from_dict(TrainConfig, base, source="sweep trial")
    static = {"k": k, "silhouette": sil, "inertia": inertia, "kmeans_iterations": iterations,
              "smallest_domain": int(sizes.min()), "largest_domain": int(sizes.max()),
              "heldout_documents": int(len(eval_idx)), "seconds_cluster": cluster_seconds}

    def report(row: dict[str, Any]) -> None:
        if row.get("eval_loss") is None:
            return
        by = row.get("eval_loss_by_domain") or {}
        tune.report({**static, "step": int(row["step"]), "eval_loss": _heldout_loss(by, q),
                     "eval_loss_uniform": float(row["eval_loss"]), "train_loss": row.get("train_loss"),
                     "seconds": time.perf_counter() - t0})

    Path(tcfg.output).mkdir(parents=True, exist_ok=True)
    run_training_loop(tcfg.validate(), report=report)


# ----------------------------------------------------------------------------------------------- driver
def _validate_input(cfg: SweepConfig) -> Any:
    """Settings and corpus checks before any Ray work; returns the RegroupConfig used for embedding."""
    from rnb_ray.config import from_dict
    from rnb_ray.regroup.config import RegroupConfig

    cfg.validate()
    if not cfg.output:
        raise RnbError("no output directory given", where="--output", fix="pass --output OUT")
    if not cfg.input:
        raise RnbError("no input corpus given", where="--input", fix="pass --input CORPUS (parquet file or dir)")
    from rnb_ray.storage import refuse_uris

    refuse_uris("rnb sweep", {"--input": cfg.input, "--output": cfg.output})
    if not Path(cfg.input).exists():
        raise RnbError(f"input corpus {cfg.input} does not exist", where="--input", fix="check the path")
    out = Path(cfg.output).absolute()
    rcfg = from_dict(RegroupConfig, {k: v for k, v in {
        "input": cfg.input, "output": str(out / "regrouped"), "text_column": cfg.text_column,
        "domain_column": cfg.domain_column, "model": cfg.model, "cache_dir": cfg.cache_dir, "seed": cfg.seed,
        "max_iter": cfg.max_iter, "k": max(cfg.k), "seed_sample": max(SEED_SAMPLE, max(cfg.k)), "overwrite": True,
    }.items() if v is not None}, source="rnb sweep")
    from rnb_ray.regroup.regroup import validate as validate_regroup

    corpus = validate_regroup(rcfg)
    if corpus.num_rows is not None:
        cfg.validate(n_documents=corpus.num_rows)
    _train_base(cfg)  # a bad --train-config fails here, not in every trial
    return rcfg


def _train_base(cfg: SweepConfig) -> dict[str, Any]:
    if not cfg.train_config:
        # Proxy runs: small and quick, with a higher learning rate so that tens of steps get past
        # learning token frequencies and the domains start to matter.
        return {"batch_size": 8, "seq_len": 64, "lr": 2e-3, "warmup_steps": 5}
    import yaml

    p = Path(cfg.train_config)
    if not p.is_file():
        raise RnbError(f"train config {p} does not exist", where="--train-config")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise RnbError(f"{p} must hold a mapping of TrainConfig settings", where="--train-config")
    from rnb_ray.balance.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RnbError(f"unknown TrainConfig setting(s) {', '.join(unknown)}", where=str(p),
                       fix=f"valid settings are: {', '.join(sorted(names))}")
    for owned in ("data", "eval_data", "output", "strategy", "lam", "steps", "eval_every", "workers", "resume"):
        data.pop(owned, None)  # the sweep sets these per trial
    return data


def _error_text(err: BaseException | None) -> str | None:
    if err is None:
        return None
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}"
    return text.strip().splitlines()[-1][:500] if "\n" in text else text[:500]


def _rows_from(results: Any, cfg: SweepConfig) -> list[TrialRow]:
    rows = []
    for r in results:
        c = r.config or {}
        m = r.metrics or {}
        best, losses = None, {}
        try:
            df = r.metrics_dataframe
            if df is not None and "eval_loss" in df and "step" in df:
                best = float(df["eval_loss"].min())
                losses = {int(st): float(v) for st, v in zip(df["step"], df["eval_loss"], strict=True)}
        except Exception:  # noqa: BLE001 - a trial with no results has no dataframe
            best, losses = None, {}
        steps = m.get("step")
        status = "failed" if r.error else ("completed" if steps is not None and steps >= cfg.trial_steps
                                           else "stopped")
        trial_id = trial_name(int(c["k"]), str(c["setting"]["strategy"]), float(c["setting"]["lam"]))
        rows.append(TrialRow(
            trial_id=str(trial_id), k=int(c["k"]), lam=float(c["setting"]["lam"]),
            strategy=str(c["setting"]["strategy"]),
            status=status, eval_loss=m.get("eval_loss"), best_eval_loss=best, steps=steps,
            silhouette=m.get("silhouette"), inertia=m.get("inertia"), smallest_domain=m.get("smallest_domain"),
            largest_domain=m.get("largest_domain"),
            seconds=m.get("time_total_s") if m.get("time_total_s") is not None else m.get("seconds"),
            error=_error_text(r.error), losses=losses,
        ))
    return sort_rows(rows)


def _check_resumable(out: Path, cfg: SweepConfig) -> bool:
    """True when OUT holds an interrupted sweep with the same settings (resume it)."""
    saved = out / "config.json"
    if not (out / "tune").exists():
        return False
    ignore = {"output", "resume", "write_best"}
    if saved.is_file():
        old = {k: v for k, v in json.loads(saved.read_text(encoding="utf-8")).items() if k not in ignore}
        new = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
        if old != new:
            diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise RnbError(f"{out} holds a sweep with other settings ({', '.join(diffs)})", where="--output",
                           fix="choose another --output, or pass --no-resume to start this one from scratch")
    return cfg.resume


def run_sweep(cfg: SweepConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; write the results into ``cfg.output``; return results.json's content.

    Ray must be initialised (``ray_env.connect``).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rnb_ray.ray_env import require_resources, rnb_errors_from_ray
    from rnb_ray.regroup.regroup import embed_corpus

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    rcfg = _validate_input(cfg)
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    resume = _check_resumable(out, cfg)
    if not resume:
        for stale in ("tune", "trials"):
            if (out / stale).exists():
                shutil.rmtree(out / stale)
    save_config(cfg, out / "config.json")
    require_resources(cpus=cfg.cpus_per_trial, what=f"a sweep trial ({cfg.cpus_per_trial:g} CPU)")

    t0 = time.perf_counter()
    with rnb_errors_from_ray():
        emb = embed_corpus(rcfg)
    cfg.validate(n_documents=emb.n)
    n_train = emb.n - int(round(emb.n * HELDOUT_FRACTION))
    too_big = [k for k in cfg.k if k > max(1, n_train)]
    if too_big:
        raise RnbError(f"k={too_big} exceeds the {n_train} training documents left after the held-out split",
                       where="--k", fix=f"use k <= {n_train}")
    data = _load(cfg, emb)
    say(f"[sweep] {emb.n} documents embedded ({'cache hit' if emb.cache_hit else 'computed'}, "
        f"{time.perf_counter() - t0:.1f} s); {int(data.heldout.sum())} held out; trials: {len(cfg.grid())}")

    fail_k = [int(x) for x in os.environ.get(FAIL_ENV, "").split(",") if x.strip()]
    cpus = ray.cluster_resources().get("CPU", 1.0)
    concurrent = cfg.max_concurrent_trials or max(1, int(cpus // cfg.cpus_per_trial))
    settings = {
        "cpus_per_trial": cfg.cpus_per_trial, "metric": rcfg.metric, "seed": cfg.seed, "max_iter": cfg.max_iter,
        "silhouette_sample": cfg.silhouette_sample, "fail_k": fail_k, "trial_steps": cfg.trial_steps,
        "eval_every": cfg.eval_every, "train_base": _train_base(cfg), "trials_dir": str(out / "trials"),
    }
    trainable = tune.with_resources(tune.with_parameters(_trial, data=data, settings=settings),
                                    {"cpu": cfg.cpus_per_trial})
    evals = math.ceil(cfg.trial_steps / cfg.eval_every)
    if cfg.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=evals,
                                  grace_period=max(1, min(evals, math.ceil(cfg.grace_steps / cfg.eval_every))),
                                  reduction_factor=cfg.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    grid = cfg.grid()
    param_space = {"k": tune.grid_search(sorted({g["k"] for g in grid})),
                   "setting": tune.grid_search([{"strategy": s, "lam": lam} for s, lam in
                                                dict.fromkeys((g["strategy"], g["lam"]) for g in grid)])}
    tune_dir = out / "tune"
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        say(f"[sweep] resuming the interrupted sweep in {tune_dir}")
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, restart_errored=True)
    else:
        if tune_dir.exists():
            shutil.rmtree(tune_dir)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric="eval_loss", mode="min", scheduler=scheduler,
                                        max_concurrent_trials=concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
    say(f"[sweep] running {len(grid)} trial(s), {concurrent} at a time, {cfg.cpus_per_trial:g} CPU each, "
        f"{cfg.trial_steps} steps, scheduler {cfg.scheduler}")
    t1 = time.perf_counter()
    results = tuner.fit()
    tune_seconds = time.perf_counter() - t1

    rows = _rows_from(results, cfg)
    best = pick_best(rows)
    agreement = silhouette_agreement(rows)
    table = format_table(rows, best)
    say("[sweep] results (* = best):\n" + table)
    for g in agreement:
        say(f"[sweep] silhouette vs held-out loss at step {g['at_step']} ({g['strategy']}, λ={g['lam']:g}, "
            f"{g['n']} k values): "
            f"Spearman {_r(g['spearman'])}, Pearson {_r(g['pearson'])}; best-silhouette k={g['k_best_silhouette']}, "
            f"best-loss k={g['k_best_loss']} ({'agree' if g['agrees'] else 'disagree'})")
    doc = {"trials": [r.to_dict() for r in rows], "silhouette_vs_loss": agreement,
           "best": best.to_dict() if best else None, "n_documents": emb.n,
           "heldout_documents": int(data.heldout.sum()), "seconds_tune": tune_seconds,
           "seconds_total": time.perf_counter() - t0, "concurrent_trials": concurrent,
           "cpus_per_trial": cfg.cpus_per_trial, "embeddings": str(emb.path)}
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv_rows(rows))
    atomic.write_text(out / "results.csv", buf.getvalue())
    atomic.write_json(out / "results.json", doc, default=_json_default)
    if best is None:
        raise RnbError(f"every sweep trial failed ({len(rows)} trials); see {out / 'results.csv'}",
                       where=str(out / "tune"), fix="read the errors above; fix the input or the settings")
    best_doc = {**best.to_dict(), "trial_steps": cfg.trial_steps}
    if cfg.write_best:
        from rnb_ray.regroup.regroup import regroup

        rbest = dataclasses.replace(rcfg, k=best.k, output=str(out / "regrouped"), overwrite=True)
        with rnb_errors_from_ray():
            regroup(rbest)
        best_doc["regrouped"] = str(out / "regrouped")
        say(f"[sweep] regrouped corpus for k={best.k}: {out / 'regrouped'}")
    atomic.write_json(out / "best.json", best_doc, default=_json_default)
    say(f"[sweep] best: k={best.k} ({best.strategy}, λ={best.lam:g}), held-out loss {best.eval_loss:.4f}; "
        f"{out / 'results.csv'}")
    return doc


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return str(o)
