"""`rnb run`: regroup → sweep k → regroup at the best k → R&B training → report, in one run directory.

Every stage writes into ``RUN/<stage>/`` and, when it finishes, a marker ``RUN/.rnb-stages/<stage>.json``
holding the hash of its settings and of the stages it read from. A later ``rnb run`` with the same
settings skips the stage; changed settings redo it and everything downstream. An interrupted stage has
no marker and is redone; the sweep resumes its Tune experiment (finished trials are kept).

Stages (ARCHITECTURE.md, "Pipeline run directory"):

* ``corpus``  — only without ``--input``: the embedded default corpus, ``RUN/corpus/sample.parquet``.
* ``sweep``   — embeds the corpus once (cache ``RUN/.rnb-cache``), runs a Ray Tune trial per k,
  writes ``RUN/sweep/{results.csv,results.json,best.json}``.
* ``regroup`` — the corpus clustered at the best k with the full distributed k-means: ``RUN/regroup/``.
* ``tokens``  — only with ``--tokenize``: the regrouped corpus as per-domain token shards (``rnb tokenize``,
  the training tokenizer), ``RUN/tokens/``; the final training then packs from them.
* ``train``   — R&B training on the regrouped corpus: ``RUN/train/`` (training run directory).
* ``report``  — ``RUN/report/report.html`` + PNGs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rnb_ray import atomic, ray_env
from rnb_ray.balance.config import TrainConfig
from rnb_ray.config import from_dict, read_settings, to_dict
from rnb_ray.errors import RnbError
from rnb_ray.regroup.config import (
    DEFAULT_BACKEND,
    DEFAULT_PRECISION,
    EMBED_GPUS_HELP,
    EMBED_PRECISION_HELP,
    EmbedBackend,
    EmbedPrecision,
    RegroupConfig,
    check_embed_phases,
    phase_settings,
)
from rnb_ray.regroup.distributed import kmeans_device
from rnb_ray.regroup.regroup import regroup
from rnb_ray.sample import SAMPLE_MODULES, write_sample_corpus
from rnb_ray.storage import refuse_uris
from rnb_ray.sweep.config import SweepConfig
from rnb_ray.sweep.tune import run_sweep

SAMPLE_DOMAIN_COLUMN = "source"
REGROUP_SETTINGS = ("input", "k", "text_column", "domain_column", "model", "cache_dir", "seed")  # hashed
# Hashed only when not at their defaults, so runs made before these settings existed stay current; GPUs per
# actor do not change the embeddings (nor the embedding cache key) and are not hashed.
EMBED_SETTINGS = {"embed_backend": DEFAULT_BACKEND, "embed_precision": DEFAULT_PRECISION, "sweep_embed_backend": None}


@dataclass(frozen=True)
class PipelineConfig:
    output: str = field(default="", metadata={"help": "run directory (every stage writes under it)"})
    input: str | None = field(
        default=None, metadata={"help": "corpus (parquet file/dir); default: the embedded stdlib-docstring corpus"})
    text_column: str = field(default="text", metadata={"help": "column holding the documents"})
    domain_column: str | None = field(
        default=None,
        metadata={"help": "original domain column for the cross-tab (default: 'source' for the embedded corpus)"})
    model: str | None = field(default=None, metadata={"help": "sentence-transformers model (default: MiniLM)"})
    k: tuple[int, ...] = field(default=(4, 8, 12), metadata={"help": "candidate numbers of domains"})
    sweep_strategy: tuple[str, ...] = field(
        default=("stratified",), metadata={"help": "proxy-run sampling in the sweep: stratified and/or rnb"})
    trial_steps: int = field(default=40, metadata={"help": "training steps of each sweep trial"})
    sweep_eval_every: int = field(default=10, metadata={"help": "steps between evaluations in sweep trials"})
    strategy: str = field(default="rnb", metadata={"help": "mixing strategy of the final training"})
    lam: float = field(default=3.0, metadata={"help": "R&B λ of the final training (and rnb sweep trials)"})
    steps: int = field(default=120, metadata={"help": "training steps of the final run"})
    eval_every: int = field(default=20, metadata={"help": "steps between evaluations in the final run"})
    update_every: int = field(default=10, metadata={"help": "steps per mixing round in the final run"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers of the final run"})
    train_config: str | None = field(
        default=None, metadata={"help": "YAML/JSON TrainConfig for the sweep trials and the final run"})
    cache_dir: str | None = field(default=None, metadata={"help": "embedding cache (default: RUN/.rnb-cache)"})
    embed_backend: EmbedBackend = field(default=DEFAULT_BACKEND, metadata={"help": (
        "embedding backend of the final regroup and, unless --sweep-embed-backend, of the sweep: torch, onnx, "
        "onnx-int8 or static (see rnb regroup --help) (default: torch)")})
    sweep_embed_backend: EmbedBackend | None = field(default=None, metadata={"help": (
        "embedding backend of the sweep (default: --embed-backend); a different one costs a second embedding "
        "of the corpus (README: Embedding backends)")})
    embed_gpus: float = field(default=0.0, metadata={"help": EMBED_GPUS_HELP})
    embed_precision: EmbedPrecision = field(default=DEFAULT_PRECISION, metadata={"help": EMBED_PRECISION_HELP})
    kmeans_device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": (
        "where k-means runs in the sweep and the regroup: cpu, cuda (an error at once without a GPU) or auto "
        "(cuda when the cluster has a GPU); not part of the stages' settings hash")})
    tokenize: bool = field(default=False, metadata={"help": (
        "pre-tokenise the regrouped corpus into per-domain token shards (RUN/tokens, `rnb tokenize`) and train on "
        "them packed (no padding), with the training tokenizer")})
    tokenize_workers: int = field(default=2, metadata={"help": "tokenizer actors of the tokens stage (1 CPU each)"})
    seed: int = field(default=0, metadata={"help": "seed for every stage"})
    force: bool = field(default=False, metadata={"help": "redo every stage even when its output is current"})
    quiet: bool = field(default=False, metadata={"help": "no progress line while the final training runs"})
    track: str | None = field(default=None, metadata={"help": (
        "experiment tracking of the final training: tensorboard, mlflow or both (written under RUN/train/tracking; "
        "see rnb train --track); not part of the stages' settings hash")})

    def validate(self) -> None:
        if not self.output:
            raise RnbError("no run directory given", where="--output", fix="pass --output runs/NAME")
        refuse_uris("rnb run", {"--input": self.input, "--output": self.output})
        if self.input is not None and not Path(self.input).exists():
            raise RnbError(f"input corpus {self.input} does not exist", where="--input",
                           fix="pass a parquet file or directory, or omit --input for the embedded corpus")
        for name in ("trial_steps", "steps", "eval_every", "sweep_eval_every", "update_every", "workers",
                     "tokenize_workers"):
            if getattr(self, name) <= 0:
                raise RnbError(f"{name} must be positive, got {getattr(self, name)}",
                               where="--" + name.replace("_", "-"))
        if self.lam <= 0:
            raise RnbError(f"λ must be positive, got {self.lam}", where="--lam", fix="the paper uses 3")
        if self.train_config is not None and not Path(self.train_config).is_file():
            raise RnbError(f"train config {self.train_config} does not exist", where="--train-config")
        check_embed_phases(self.embed_backend, self.sweep_embed_backend, self.embed_gpus, self.embed_precision)
        from rnb_ray.balance.tracking import parse_track

        parse_track(self.track)

    @property
    def sweep_backend(self) -> str:
        return self.sweep_embed_backend or self.embed_backend


def settings_hash(settings: dict[str, Any], upstream: list[str] | None = None) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream or []}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def portable(settings: dict[str, Any], run: Path) -> dict[str, Any]:
    """Paths inside the run directory written relative to it, so a moved/copied run stays current."""
    root = str(run)
    return {k: ("RUN" + v[len(root):] if isinstance(v, str) and (v == root or v.startswith(root + os.sep)) else v)
            for k, v in settings.items()}


def _read(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class _Stages:
    """Runs stages in order, skipping those whose marker matches, and records them in pipeline.json.

    Markers live in ``RUN/.rnb-stages/<stage>.json`` (written when the stage finished) and
    ``<stage>.started.json`` (written before it starts), so a stage's own directory holds only its output.
    """

    def __init__(self, run: Path, cfg: PipelineConfig, log: Callable[[str], None]):
        self.run, self.cfg, self.log = run, cfg, log
        self.markers = run / ".rnb-stages"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.record: dict[str, dict[str, Any]] = {}

    def stage(self, name: str, settings: dict[str, Any], upstream: list[str],
              body: Callable[[Path], None], *, resumable: bool = False) -> str:
        """Run ``body(stage_dir)`` unless a finished stage with the same hash is there; return the hash.

        ``resumable`` stages (the sweep: Tune restores its trials) keep a partial output written with the
        same settings; the others start from an empty directory.
        """
        d = self.run / name
        settings = portable(settings, self.run)
        h = settings_hash(settings, upstream)
        done, started = self.markers / f"{name}.json", self.markers / f"{name}.started.json"
        marker = _read(done)
        if not self.cfg.force and marker is not None and marker.get("hash") == h and d.exists():
            self.log(f"[{name}] up to date (settings {h}), reusing {d}")
            self.record[name] = {"hash": h, "skipped": True, "seconds": marker.get("seconds", 0.0),
                                 "output": str(d)}
            return h
        done.unlink(missing_ok=True)
        partial_ok = resumable and not self.cfg.force and (_read(started) or {}).get("hash") == h
        if d.exists() and not partial_ok:
            shutil.rmtree(d)  # stale output (other settings) or a partial stage that cannot resume
        atomic.write_json(started, {"hash": h})
        self.log(f"[{name}] running (settings {h})")
        t0 = time.perf_counter()
        body(d)
        seconds = time.perf_counter() - t0
        atomic.write_json(done, {"stage": name, "hash": h, "seconds": seconds, "settings": settings,
                                 "upstream": upstream})
        self.log(f"[{name}] done in {seconds:.1f} s")
        self.record[name] = {"hash": h, "skipped": False, "seconds": seconds, "output": str(d)}
        return h


def _train_file(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``--train-config`` settings as written ({} without one): hashed into the sweep and train stages."""
    if cfg.train_config is None:
        return {}
    return read_settings(TrainConfig, cfg.train_config, where="--train-config")


def run_pipeline(cfg: PipelineConfig, *, address: str | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage into ``cfg.output``; return the pipeline summary (pipeline.json).

    Each stage gets its typed config (``SweepConfig``, ``RegroupConfig``, ``TrainConfig``); a stage's hash is
    over the settings the pipeline gives it (``--train-config``'s as written), relative to RUN.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg.validate()
    run = Path(cfg.output).absolute()
    if run.exists() and not run.is_dir():
        raise RnbError(f"--output {run} is a file", fix="pass a directory")
    if run.is_dir() and any(run.iterdir()) and not (run / "pipeline.json").is_file() \
            and not any((run / s).is_dir() for s in ("corpus", "sweep", "regroup", "tokens", "train")):
        raise RnbError(f"--output {run} is a non-empty directory that is not an rnb run",
                       fix="choose a new directory for the run")
    run.mkdir(parents=True, exist_ok=True)
    stages = _Stages(run, cfg, log)
    t_start = time.perf_counter()

    # corpus -------------------------------------------------------------------------------------------
    domain_column = cfg.domain_column
    if cfg.input is None:
        corpus_hash = stages.stage(
            "corpus", {"modules": list(SAMPLE_MODULES), "python": sys.version.split()[0]}, [],
            lambda d: write_sample_corpus(d / "sample.parquet"))  # atomic: tmp file, then rename
        corpus = str(run / "corpus" / "sample.parquet")
        domain_column = domain_column or SAMPLE_DOMAIN_COLUMN
    else:
        corpus = str(Path(cfg.input).absolute())
        corpus_hash = settings_hash({"input": corpus, "fingerprint": _fingerprint(Path(corpus))})
    cache_dir = str(Path(cfg.cache_dir).absolute()) if cfg.cache_dir else str(run / ".rnb-cache")

    # The sweep's and the final training's configs, typed, before any Ray work (bad settings fail in seconds).
    # Final training: --train-config's settings over the pipeline's defaults, then the pipeline's own values.
    train_file = _train_file(cfg)
    train_settings = {**({"category_column": domain_column} if domain_column is not None else {}), **train_file,
                      "data": str(run / "regroup"), "strategy": cfg.strategy, "lam": cfg.lam, "steps": cfg.steps,
                      "eval_every": cfg.eval_every, "update_every": cfg.update_every, "workers": cfg.workers,
                      "seed": cfg.seed, "text_column": cfg.text_column}
    if cfg.tokenize:  # token shards keep no category column; the split is per document (balance/split.py)
        train_settings = {**train_settings, "data": str(run / "tokens"), "category_column": None}
    train_cfg = from_dict(TrainConfig, train_settings, source="rnb run",
                          validate=False)  # validated by train(), once its data (the regroup stage's output) exists
    sweep_cfg = SweepConfig(
        input=corpus, output=str(run / "sweep"), k=tuple(cfg.k), lam=(float(cfg.lam),),
        strategy=tuple(cfg.sweep_strategy), trial_steps=cfg.trial_steps, eval_every=cfg.sweep_eval_every,
        grace_steps=min(cfg.sweep_eval_every * 2, cfg.trial_steps), text_column=cfg.text_column,
        domain_column=domain_column, model=cfg.model, cache_dir=cache_dir, train_config=cfg.train_config,
        write_best=False, seed=cfg.seed, kmeans_device=cfg.kmeans_device,
        **phase_settings(cfg.sweep_backend, cfg.embed_gpus, cfg.embed_precision))
    sweep_cfg.validate()

    ray_env.connect(address)
    if cfg.embed_gpus > 0:  # fail at once, not after the sweep when the final regroup wants the GPU
        ray_env.require_resources(gpus=cfg.embed_gpus, what=f"embedding ({cfg.embed_gpus:g} GPU per actor)",
                                  gpu_fix="drop --embed-gpus (embed on CPU), or run on a cluster with GPU nodes")
    kmeans_device(cfg.kmeans_device)  # --kmeans-device cuda on a cluster without a GPU fails here, before any stage

    # sweep ----------------------------------------------------------------------------------------------
    # where k-means runs is not what it computes: a device change alone keeps the stages
    sweep_settings = _drop_defaults({k: v for k, v in to_dict(sweep_cfg).items()
                                     if k not in ("output", "resume", "embed_gpus", "kmeans_device")})
    sweep_settings["train_config"] = train_file  # the content, not the file name
    sweep_hash = stages.stage("sweep", sweep_settings, [corpus_hash],
                              lambda d: run_sweep(dataclasses.replace(sweep_cfg, output=str(d)), log=log),
                              resumable=True)
    best = json.loads((run / "sweep" / "best.json").read_text(encoding="utf-8"))
    best_k = int(best["k"])

    # regroup at the best k --------------------------------------------------------------------------------
    regroup_cfg = RegroupConfig(output="", input=corpus, k=best_k, text_column=cfg.text_column,
                                domain_column=domain_column, model=cfg.model, cache_dir=cache_dir, seed=cfg.seed,
                                kmeans_device=cfg.kmeans_device,
                                **phase_settings(cfg.embed_backend, cfg.embed_gpus, cfg.embed_precision))
    regroup_settings = {k: getattr(regroup_cfg, k) for k in REGROUP_SETTINGS if getattr(regroup_cfg, k) is not None}
    regroup_settings.update(_drop_defaults({k: getattr(regroup_cfg, k) for k in EMBED_SETTINGS
                                            if hasattr(regroup_cfg, k)}))
    regroup_hash = stages.stage("regroup", regroup_settings, [corpus_hash, sweep_hash],
                                lambda d: regroup(dataclasses.replace(regroup_cfg, output=str(d))))

    # final training -------------------------------------------------------------------------------------------
    from rnb_ray.balance.train import train  # torch: imported when a run gets this far, not by `rnb --help`

    data_hash = regroup_hash
    if cfg.tokenize:
        from rnb_ray.tokens.config import TokenizeConfig
        from rnb_ray.tokens.job import tokenize_corpus

        tok_cfg = TokenizeConfig(data=str(run / "regroup"), output=str(run / "tokens"), tokenizer=train_cfg.tokenizer,
                                 model=train_cfg.model, text_column=cfg.text_column, workers=cfg.tokenize_workers)
        tok_settings = {k: getattr(tok_cfg, k) for k in ("data", "tokenizer", "model", "text_column", "domain_column")}
        data_hash = stages.stage("tokens", tok_settings, [regroup_hash],
                                 lambda d: tokenize_corpus(dataclasses.replace(tok_cfg, output=str(d))))

    train_hash = stages.stage("train", train_settings, [data_hash],
                              lambda d: train(dataclasses.replace(train_cfg, output=str(d), quiet=cfg.quiet,
                                                                  track=cfg.track or train_cfg.track)))

    # report ----------------------------------------------------------------------------------------------------
    summary: dict[str, Any] = {
        "config": to_dict(cfg), "corpus": corpus, "best": best, "stages": stages.record,
        "seconds_total": None,
    }
    atomic.write_json(run / "pipeline.json", summary)  # the report reads stage timings from it
    from rnb_ray.report.html import write_report  # matplotlib: as for train

    stages.stage("report", {"version": 1}, [train_hash, sweep_hash], lambda d: write_report(run, d))
    summary["stages"] = stages.record
    summary["seconds_total"] = time.perf_counter() - t_start
    atomic.write_json(run / "pipeline.json", summary)
    log(f"done in {summary['seconds_total']:.1f} s: best k = {best_k}; report: {run / 'report' / 'report.html'}")
    return summary


def _drop_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """Embedding settings at their defaults left out of a stage hash (see ``EMBED_SETTINGS``)."""
    return {k: v for k, v in settings.items() if k not in EMBED_SETTINGS or v != EMBED_SETTINGS[k]}


def _fingerprint(p: Path) -> list[tuple[str, int, int]]:
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

