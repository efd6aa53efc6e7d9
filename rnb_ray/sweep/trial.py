"""One sweep trial: cluster the training embeddings for k, write the trial's corpus, train a proxy run, report.

Everything a trial needs is typed and put in the object store once (``tune.with_parameters``): the
embeddings and texts (``SweepData``) and a ``TrialPlan`` — the ``RegroupConfig`` whose k-means settings the
trial clusters with (``regroup.clustering.fit_array``: regroup's seeding and Lloyd loop, in-process) and the
proxy runs' base ``TrainConfig``. Ray Tune's ``param_space`` carries only the swept values (k, and the
strategy with its λ); the trial completes the base config with ``dataclasses.replace`` and validates it
once.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rnb_ray.balance.config import TrainConfig
from rnb_ray.config import from_dict, read_settings
from rnb_ray.corpus import ROW_ID
from rnb_ray.corpus_read import read_fragment
from rnb_ray.errors import RnbError
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.cache import EmbeddingSet
from rnb_ray.regroup.clustering import fit_array, silhouette_array
from rnb_ray.regroup.config import RegroupConfig
from rnb_ray.regroup.embed import EMB_ROW_ID, EMBEDDING, embeddings_numpy
from rnb_ray.sweep.config import SweepConfig

HELDOUT_FRACTION = 0.1
HELDOUT_SALT = 104729  # the held-out choice must not correlate with the k-means seeding sample
FAIL_ENV = "RNB_SWEEP_FAIL_K"  # fault injection for tests: comma-separated k values whose trials raise
TRIAL_COLUMNS = ("text", "domain")

# Proxy runs without --train-config: small and quick, with a higher learning rate so that tens of steps get
# past learning token frequencies and the domains start to matter.
PROXY_DEFAULTS: dict[str, Any] = {"batch_size": 8, "seq_len": 64, "lr": 2e-3, "warmup_steps": 5}
# What the sweep sets in every proxy run; a --train-config's values for these are ignored.
SWEEP_OWNED = ("data", "eval_data", "output", "strategy", "lam", "steps", "eval_every", "workers", "resume")


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class SweepData:
    """What every trial needs, put in the object store once."""

    X: np.ndarray  # (n, d) float32 embeddings, input order
    texts: list[str]
    original: list[str] | None  # original domain per document (cross-tab), or None
    heldout: np.ndarray  # (n,) bool


@dataclass(frozen=True)
class TrialPlan:
    """The typed settings every trial shares (the swept k, strategy and λ come from Ray Tune)."""

    regroup: RegroupConfig  # k-means settings: metric, seed, max_iter, tol, seed_sample
    train: TrainConfig  # proxy run base: the trial sets data, eval_data, output, strategy, lam
    silhouette_sample: int
    cpus_per_trial: float
    trials_dir: str
    fail_k: tuple[int, ...] = ()


def proxy_train_config(cfg: SweepConfig) -> TrainConfig:
    """The proxy runs' TrainConfig, less what each trial sets; names and types checked, not yet validated.

    ``--train-config`` replaces ``PROXY_DEFAULTS``; its ``log_every`` and ``update_every`` win over the sweep's
    defaults (every evaluation, rounds of at most 10 steps).
    """
    given = PROXY_DEFAULTS
    if cfg.train_config:
        given = {k: v for k, v in read_settings(TrainConfig, cfg.train_config, where="--train-config").items()
                 if k not in SWEEP_OWNED}
    base = from_dict(TrainConfig, {"data": "", "log_every": cfg.eval_every, "update_every": min(10, cfg.trial_steps),
                                   **given}, source=cfg.train_config or "rnb sweep", validate=False)
    return dataclasses.replace(base, text_column=TRIAL_COLUMNS[0], domain_column=TRIAL_COLUMNS[1],
                               steps=cfg.trial_steps, eval_every=cfg.eval_every, workers=1, seed=cfg.seed,
                               checkpoint_every=0)


def load_data(cfg: SweepConfig, emb: EmbeddingSet) -> SweepData:
    """Embeddings (from the cache) and texts of the embedded documents, aligned by row id."""
    ids_parts, x_parts = [], []
    for f in emb.files():
        t = pq.read_table(f, columns=[EMB_ROW_ID, EMBEDDING])
        ids_parts.append(t.column(EMB_ROW_ID).to_numpy())
        x_parts.append(embeddings_numpy(t.column(EMBEDDING)))
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
def trial_name(k: int, strategy: str, lam: float) -> str:
    return f"k{k}-{strategy}" + (f"-lam{lam:g}" if strategy == "rnb" else "")


def swept(config: dict[str, Any]) -> tuple[int, str, float]:
    """``(k, strategy, λ)`` of a trial from its Ray Tune config (the param_space of ``tune.run_sweep``)."""
    return int(config["k"]), str(config["setting"]["strategy"]), float(config["setting"]["lam"])


def heldout_loss(by_domain: dict[str, float], q: dict[str, float]) -> float:
    """Loss per held-out document: domain losses weighted by the held-out share of each domain."""
    w = {d: q[d] for d in by_domain if d in q}
    total = sum(w.values())
    if total <= 0:
        return float("nan")
    return sum(by_domain[d] * w[d] for d in w) / total


def run_trial(config: dict[str, Any], data: SweepData | None = None, plan: TrialPlan | None = None) -> None:
    """One Ray Tune trial: cluster for k, write this trial's corpus, train a proxy run, report."""
    import torch  # heavy: only trial processes need it
    from ray import tune

    from rnb_ray.balance.train import run_training_loop  # imports torch

    assert data is not None and plan is not None
    k, strategy, lam = swept(config)
    rcfg = plan.regroup
    torch.set_num_threads(max(1, int(plan.cpus_per_trial)))
    # Our own directory per grid point (not Tune's trial dir: with reused actors and restores that moves).
    trial_dir = Path(plan.trials_dir) / trial_name(k, strategy, lam)
    if trial_dir.exists():
        shutil.rmtree(trial_dir)  # a restarted trial starts clean
    trial_dir.mkdir(parents=True)
    t0 = time.perf_counter()

    train_idx = np.flatnonzero(~data.heldout)
    eval_idx = np.flatnonzero(data.heldout)
    kmr = fit_array(data.X[train_idx], k, metric=rcfg.metric, seed=rcfg.seed, max_iter=rcfg.max_iter, tol=rcfg.tol,
                    sample_size=rcfg.seed_sample, device=rcfg.kmeans_device)
    assert kmr.labels is not None
    labels = kmr.labels
    eval_labels, _ = km.assign(data.X[eval_idx], kmr.centroids, rcfg.metric)  # type: ignore[arg-type]
    sizes = np.bincount(labels, minlength=k)
    sil = silhouette_array(data.X, kmr.centroids, metric=rcfg.metric, sample_size=plan.silhouette_sample,
                           seed=rcfg.seed)
    if k in plan.fail_k:
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

    tcfg = dataclasses.replace(
        plan.train, data=train_path, eval_data=eval_path, output=str(trial_dir / "train"), strategy=strategy, lam=lam,
        eval_max_per_domain=max(plan.train.eval_max_per_domain, int(eval_counts.max())),
    ).validate()
    static = {"k": k, "silhouette": None if np.isnan(sil) else sil, "inertia": kmr.inertia,
              "kmeans_iterations": kmr.iterations, "smallest_domain": int(sizes.min()),
              "largest_domain": int(sizes.max()), "heldout_documents": int(len(eval_idx)),
              "seconds_cluster": cluster_seconds}

    def report(row: dict[str, Any]) -> None:
        if row.get("eval_loss") is None:
            return
        by = row.get("eval_loss_by_domain") or {}
        tune.report({**static, "step": int(row["step"]), "eval_loss": heldout_loss(by, q),
                     "eval_loss_uniform": float(row["eval_loss"]), "train_loss": row.get("train_loss"),
                     "seconds": time.perf_counter() - t0})

    Path(tcfg.output).mkdir(parents=True, exist_ok=True)
    run_training_loop(tcfg, report=report)
