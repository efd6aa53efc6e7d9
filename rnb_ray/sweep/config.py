"""SweepConfig: which k (and λ, strategy) to try, how long each proxy run is, how trials share the cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rnb_ray.errors import RnbError
from rnb_ray.regroup.config import (
    DEFAULT_BACKEND,
    DEFAULT_PRECISION,
    EMBED_BACKEND_HELP,
    EMBED_GPUS_HELP,
    EMBED_PRECISION_HELP,
    EmbedBackend,
    EmbedPrecision,
    check_embed_phases,
)

SWEEP_STRATEGIES = ("stratified", "rnb")


@dataclass(frozen=True)
class SweepConfig:
    input: str = field(default="", metadata={"help": "corpus: parquet file or directory"})
    output: str = field(default="", metadata={"help": "sweep output directory"})
    k: tuple[int, ...] = field(default=(4, 8, 12), metadata={"help": "candidate numbers of domains, e.g. 4,8,16"})
    lam: tuple[float, ...] = field(default=(3.0,), metadata={"help": "R&B λ values (rnb strategy only)"})
    strategy: tuple[str, ...] = field(
        default=("stratified",),
        metadata={"help": "proxy-run sampling: stratified (the paper's choice for k) and/or rnb"},
    )
    trial_steps: int = field(default=40, metadata={"help": "training steps of each proxy run"})
    eval_every: int = field(default=10, metadata={"help": "steps between held-out evaluations (ASHA rungs)"})
    scheduler: Literal["asha", "fifo"] = field(
        default="asha", metadata={"help": "asha stops poor trials early; fifo runs every trial to the end"})
    grace_steps: int = field(default=20, metadata={"help": "steps every trial runs before ASHA may stop it"})
    reduction_factor: int = field(default=2, metadata={"help": "ASHA: keep 1/reduction_factor trials per rung"})
    cpus_per_trial: float = field(default=1.0, metadata={"help": "CPUs reserved by each trial"})
    max_concurrent_trials: int = field(
        default=0, metadata={"help": "trials running at once; 0 = as many as the cluster's CPUs fit"})
    silhouette_sample: int = field(default=1000, metadata={"help": "documents sampled for the silhouette score"})
    # Regroup settings used by every trial (the embedding is computed once, with these).
    text_column: str = field(default="text", metadata={"help": "column holding the documents"})
    domain_column: str | None = field(
        default=None, metadata={"help": "original domain column, for the cross-tab (optional)"})
    model: str | None = field(default=None, metadata={"help": "sentence-transformers model (default: MiniLM)"})
    cache_dir: str | None = field(default=None, metadata={"help": "embedding cache (default: next to output)"})
    embed_backend: EmbedBackend = field(default=DEFAULT_BACKEND, metadata={"help": EMBED_BACKEND_HELP.replace(
        "embedding backend:", "embedding backend of the regrouped corpus (write_best) and, unless "
        "--sweep-embed-backend, of the trials:")})
    sweep_embed_backend: EmbedBackend | None = field(default=None, metadata={"help": (
        "embedding backend of the trials' clustering (default: --embed-backend); e.g. static for a cheap sweep")})
    embed_gpus: float = field(default=0.0, metadata={"help": EMBED_GPUS_HELP})
    embed_precision: EmbedPrecision = field(default=DEFAULT_PRECISION, metadata={"help": EMBED_PRECISION_HELP})
    max_iter: int = field(default=50, metadata={"help": "k-means iterations per trial"})
    kmeans_device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": (
        "where each trial's k-means runs: cpu (numpy), cuda (torch; trials share the cluster's GPUs; an error "
        "at once without one) or auto (cuda when the cluster has a GPU)")})
    # Proxy model settings (the rest comes from TrainConfig defaults or --train-config).
    train_config: str | None = field(
        default=None, metadata={"help": "YAML/JSON TrainConfig whose settings every proxy run starts from"})
    write_best: bool = field(default=True, metadata={"help": "write the regrouped corpus for the best k"})
    resume: bool = field(default=True, metadata={"help": "resume an interrupted sweep in the same output"})
    seed: int = field(default=0, metadata={"help": "seed for k-means, sampling and model init"})

    def validate(self, n_documents: int | None = None) -> None:
        if not self.k:
            raise RnbError("the k list is empty", where="--k", fix="give at least one k, e.g. --k 4,8,16")
        small = [k for k in self.k if k < 2]
        if small:
            raise RnbError(f"k must be at least 2, got {small}", where="--k",
                           fix="one domain is no mixture: use k >= 2")
        if len(set(self.k)) != len(self.k):
            raise RnbError(f"the k list repeats values: {list(self.k)}", where="--k", fix="list each k once")
        if n_documents is not None:
            big = [k for k in self.k if k > n_documents]
            if big:
                raise RnbError(f"k={big} exceeds the {n_documents} documents of the corpus", where="--k",
                               fix=f"use k <= {n_documents} (in practice far fewer)")
        if self.trial_steps <= 0:
            raise RnbError(f"trial_steps must be positive, got {self.trial_steps}", where="--trial-steps",
                           fix="give the number of training steps per proxy run, e.g. --trial-steps 40")
        if self.eval_every <= 0:
            raise RnbError(f"eval_every must be positive, got {self.eval_every}", where="--eval-every",
                           fix="e.g. --eval-every 10")
        if self.grace_steps <= 0:
            raise RnbError(f"grace_steps must be positive, got {self.grace_steps}", where="--grace-steps")
        if self.reduction_factor < 2:
            raise RnbError(f"reduction_factor must be >= 2, got {self.reduction_factor}",
                           where="--reduction-factor")
        if not self.lam or any(lam <= 0 for lam in self.lam):
            raise RnbError(f"λ values must be positive, got {list(self.lam)}", where="--lam", fix="e.g. --lam 3")
        if not self.strategy:
            raise RnbError("the strategy list is empty", where="--strategy", fix="e.g. --strategy stratified")
        unknown = [s for s in self.strategy if s not in SWEEP_STRATEGIES]
        if unknown:
            raise RnbError(f"unknown sweep strategy {unknown}", where="--strategy",
                           fix=f"use {' or '.join(SWEEP_STRATEGIES)}")
        if self.cpus_per_trial <= 0:
            raise RnbError(f"cpus_per_trial must be positive, got {self.cpus_per_trial}", where="--cpus-per-trial")
        if self.max_concurrent_trials < 0:
            raise RnbError("max_concurrent_trials must be >= 0", where="--max-concurrent-trials")
        if self.silhouette_sample < 10:
            raise RnbError(f"silhouette_sample must be >= 10, got {self.silhouette_sample}",
                           where="--silhouette-sample")
        if self.max_iter <= 0:
            raise RnbError(f"max_iter must be positive, got {self.max_iter}", where="--max-iter")
        check_embed_phases(self.embed_backend, self.sweep_embed_backend, self.embed_gpus, self.embed_precision)

    @property
    def trial_backend(self) -> str:
        """The backend the trials' embeddings are made with."""
        return self.sweep_embed_backend or self.embed_backend

    def grid(self) -> list[dict]:
        """Every (k, λ, strategy) combination; λ only varies for rnb (stratified ignores it)."""
        out = []
        for k in self.k:
            for s in self.strategy:
                for lam in (self.lam if s == "rnb" else self.lam[:1]):
                    out.append({"k": int(k), "lam": float(lam), "strategy": s})
        return out
