"""`rnb sweep`: choose the number of domains k (and λ, strategy) with Ray Tune.

The paper's Algorithm 2 / Fig. 2: for each candidate k, cluster the training embeddings into k domains,
train a short proxy model with stratified sampling over them, and keep the k with the lowest held-out
loss. Here:

1. The corpus is embedded **once** (``regroup.cache.embed_corpus``, cached) and the embeddings, with the
   texts, go into the object store once (``tune.with_parameters``); every trial reads them from there.
2. A fixed held-out set (``HELDOUT_FRACTION`` of the documents, chosen by a hash of the row id, so the
   same documents for every k) is split off. Each trial (``sweep/trial.py``) clusters the *training*
   embeddings for its k in-process with regroup's k-means (``regroup.clustering.fit_array``: the fit
   ``distributed.fit_kmeans`` runs, k-means++ on a deterministic sample, then Lloyd), assigns the held-out
   documents to the nearest centroid (the paper: never cluster the evaluation data separately), and
   scores the silhouette on a fixed sample (``regroup.clustering.silhouette_array``).
3. The trial trains a proxy run in-process (``balance.train.run_training_loop``: one worker, no
   TorchTrainer) and reports the held-out loss at every evaluation with ``tune.report``. The reported
   ``eval_loss`` is the loss per held-out *document* (domain losses weighted by the held-out share of
   each domain), so values are comparable across k; a uniform mean over domains would not be.
4. ASHA stops trials whose loss is worse than their peers' at the same step.

Why the clustering runs in-process inside the trial: a trial that launched Ray tasks (the distributed
``fit_kmeans``) would need CPUs beyond the trial's own reservation; on a 2-CPU machine with
one CPU per trial those tasks wait for CPUs that the trials hold, and the sweep stalls. Embeddings of a
corpus a proxy sweep is run on (10⁵–10⁶ documents × 384 floats) fit in a trial's memory; clustering
them in-process costs seconds. On a larger cluster, trials run in parallel (``cpus_per_trial`` each,
``max_concurrent_trials`` at once), so the sweep scales with the number of CPUs/nodes.

Outputs (``OUT``): ``results.csv`` / ``results.json`` (one row per trial: k, λ, strategy, status,
held-out loss, silhouette, inertia, smallest/largest domain, seconds, error), ``best.json``, the
silhouette-vs-loss correlation (in ``results.json``), ``config.json``, ``tune/`` (Ray Tune's experiment
directory: what ``Tuner.restore`` resumes from), ``trials/<k…>/`` (each trial's corpus split, held-out set
and proxy training run directory; on a multi-node cluster OUT must be on storage every node sees) and, with
``write_best``, ``regrouped/`` (the corpus regrouped at the best k, ready for ``rnb train``).

Settings stay typed: ``SweepConfig`` here, a ``TrialPlan`` (the ``RegroupConfig`` and the proxy runs' base
``TrainConfig``) for every trial; Ray Tune's ``param_space`` holds only the swept k, strategy and λ.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
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
from rnb_ray.ray_env import require_resources, rnb_errors_from_ray
from rnb_ray.regroup.cache import embed_corpus
from rnb_ray.regroup.clustering import SEED_SAMPLE
from rnb_ray.regroup.config import RegroupConfig, phase_settings
from rnb_ray.regroup.distributed import kmeans_device
from rnb_ray.regroup.regroup import regroup
from rnb_ray.regroup.regroup import validate as validate_regroup
from rnb_ray.storage import refuse_uris
from rnb_ray.sweep.config import SweepConfig
from rnb_ray.sweep.criteria import (
    TrialRow,
    csv_rows,
    format_table,
    pick_best,
    silhouette_agreement,
    sort_rows,
)
from rnb_ray.sweep.trial import (
    FAIL_ENV,
    HELDOUT_FRACTION,
    TrialPlan,
    load_data,
    proxy_train_config,
    run_trial,
    swept,
    trial_name,
)

__all__ = ["FAIL_ENV", "run_sweep"]


def _validate_input(cfg: SweepConfig) -> TrialPlan:
    """Settings and corpus checks before any Ray work; returns the typed settings every trial shares
    (its ``regroup`` config also embeds the corpus and, with write_best, regroups it at the best k)."""
    cfg.validate()
    if not cfg.output:
        raise RnbError("no output directory given", where="--output", fix="pass --output OUT")
    if not cfg.input:
        raise RnbError("no input corpus given", where="--input", fix="pass --input CORPUS (parquet file or dir)")
    refuse_uris("rnb sweep", {"--input": cfg.input, "--output": cfg.output})
    if not Path(cfg.input).exists():
        raise RnbError(f"input corpus {cfg.input} does not exist", where="--input", fix="check the path")
    out = Path(cfg.output).absolute()
    rcfg = RegroupConfig(
        input=cfg.input, output=str(out / "regrouped"), text_column=cfg.text_column, domain_column=cfg.domain_column,
        model=cfg.model, cache_dir=cfg.cache_dir, seed=cfg.seed, max_iter=cfg.max_iter, k=max(cfg.k),
        seed_sample=max(SEED_SAMPLE, max(cfg.k)), kmeans_device=cfg.kmeans_device, overwrite=True,
        **phase_settings(cfg.trial_backend, cfg.embed_gpus, cfg.embed_precision))
    corpus = validate_regroup(rcfg)
    if cfg.write_best:
        validate_regroup(final_regroup_config(cfg, rcfg, max(cfg.k)))
    if corpus.num_rows is not None:
        cfg.validate(n_documents=corpus.num_rows)
    fail_k = tuple(int(x) for x in os.environ.get(FAIL_ENV, "").split(",") if x.strip())
    return TrialPlan(regroup=rcfg, train=proxy_train_config(cfg),  # a bad --train-config fails here
                     silhouette_sample=cfg.silhouette_sample, cpus_per_trial=cfg.cpus_per_trial,
                     trials_dir=str(out / "trials"), fail_k=fail_k)


def final_regroup_config(cfg: SweepConfig, rcfg: RegroupConfig, k: int) -> RegroupConfig:
    """The regroup of the corpus at the best k (write_best): the trials' settings, with ``--embed-backend``."""
    return dataclasses.replace(rcfg, k=k, **phase_settings(cfg.embed_backend, cfg.embed_gpus, cfg.embed_precision))


def require_embedding_gpus(cfg: SweepConfig) -> None:
    """GPUs asked for either embedding (trials, or write_best's regroup) fail at once on a cluster without them."""
    phases = [cfg.trial_backend] + ([cfg.embed_backend] if cfg.write_best else [])
    if cfg.embed_gpus > 0 and "torch" in phases:
        require_resources(gpus=cfg.embed_gpus, what=f"embedding ({cfg.embed_gpus:g} GPU per actor)",
                          gpu_fix="drop --embed-gpus (embed on CPU), or run on a cluster with GPU nodes")


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
        k, strategy, lam = swept(c)
        rows.append(TrialRow(
            trial_id=trial_name(k, strategy, lam), k=k, lam=lam, strategy=strategy,
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
        defaults = to_dict(SweepConfig())  # settings added since that sweep was written: their defaults
        old = {k: v for k, v in {**defaults, **json.loads(saved.read_text(encoding="utf-8"))}.items()
               if k not in ignore}
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

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    plan = _validate_input(cfg)
    rcfg = plan.regroup
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    resume = _check_resumable(out, cfg)
    if not resume:
        for stale in ("tune", "trials"):
            if (out / stale).exists():
                shutil.rmtree(out / stale)
    save_config(cfg, out / "config.json")
    require_resources(cpus=cfg.cpus_per_trial, what=f"a sweep trial ({cfg.cpus_per_trial:g} CPU)")
    require_embedding_gpus(cfg)
    # auto/cuda resolved against the cluster before any work; trials then get the resolved device
    plan = dataclasses.replace(plan, regroup=dataclasses.replace(rcfg, kmeans_device=kmeans_device(cfg.kmeans_device)))
    rcfg = plan.regroup

    t0 = time.perf_counter()
    with rnb_errors_from_ray():
        emb = embed_corpus(rcfg)
    cfg.validate(n_documents=emb.n)
    n_train = emb.n - int(round(emb.n * HELDOUT_FRACTION))
    too_big = [k for k in cfg.k if k > max(1, n_train)]
    if too_big:
        raise RnbError(f"k={too_big} exceeds the {n_train} training documents left after the held-out split",
                       where="--k", fix=f"use k <= {n_train}")
    data = load_data(cfg, emb)
    say(f"[sweep] {emb.n} documents embedded ({'cache hit' if emb.cache_hit else 'computed'}, "
        f"{time.perf_counter() - t0:.1f} s); {int(data.heldout.sum())} held out; trials: {len(cfg.grid())}")

    cpus = ray.cluster_resources().get("CPU", 1.0)
    concurrent = cfg.max_concurrent_trials or max(1, int(cpus // cfg.cpus_per_trial))
    resources = {"cpu": cfg.cpus_per_trial}
    if rcfg.kmeans_device == "cuda":  # trials running at once share the cluster's GPUs for their k-means
        resources["gpu"] = min(1.0, ray.cluster_resources().get("GPU", 1.0) / concurrent)
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, plan=plan), resources)
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
    gpu_note = f" + {resources['gpu']:g} GPU (k-means)" if "gpu" in resources else ""
    say(f"[sweep] running {len(grid)} trial(s), {concurrent} at a time, {cfg.cpus_per_trial:g} CPU each{gpu_note}, "
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
           "cpus_per_trial": cfg.cpus_per_trial, "embeddings": str(emb.path), "embed_backend": emb.backend}
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv_rows(rows))
    atomic.write_text(out / "results.csv", buf.getvalue())
    atomic.write_json(out / "results.json", doc, default=_json_default)
    if best is None:
        raise RnbError(f"every sweep trial failed ({len(rows)} trials); see {out / 'results.csv'}",
                       where=str(out / "tune"), fix="read the errors above; fix the input or the settings")
    best_doc = {**best.to_dict(), "trial_steps": cfg.trial_steps}
    if cfg.write_best:
        rbest = dataclasses.replace(final_regroup_config(cfg, rcfg, best.k), output=str(out / "regrouped"),
                                    overwrite=True)
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
