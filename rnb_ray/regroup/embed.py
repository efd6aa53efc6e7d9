"""Sentence embeddings in a Ray Data actor pool: model resolution and the callable class.

``Embedder`` is the ``fn`` of ``ds.map_batches(Embedder, compute=ActorPoolStrategy(size=n), num_cpus=t)``:
the model loads once per actor in ``__init__`` and torch uses exactly the ``t`` CPUs the actor was
given (no oversubscription); with ``num_gpus`` it runs on the GPU Ray assigned it (``device="cuda"``, fp32/fp16/bf16).
``backend`` selects what computes the vectors (``backends.py``): the model in torch, its ONNX export
(``onnx``/``onnx-int8``, ``encoders.OnnxEncoder``) or a static embedder distilled from it (``encoders.StaticEncoder``).
Embeddings are L2-normalised float32. Empty or whitespace-only texts get
no embedding; they are flagged so the stage can drop and count them.

Each batch is embedded in length order: the texts are tokenized once to count their tokens, grouped into
forward passes of similar length (``length_batches``: at most ``batch_size`` documents and ``max_tokens``
padded tokens each), and the rows are put back in input order. Without this, a forward pass over a batch
in corpus order pads every short text to the longest one in it (≈4× the real tokens on the docstring
corpus), and that padding, not Ray, is where the time went.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rnb_ray.errors import RnbError
from rnb_ray.regroup.config import default_model_path

EMBEDDING = "embedding"
# The corpus row an embedding belongs to (``corpus.ROW_ID``'s value: file index · 2^40 + row in file), as the
# embedding cache and ``EmbeddingSet.dataset()`` name it, beside ``EMBEDDING``.
EMB_ROW_ID = "row_id"
EMPTY = "__rnb_empty"


@dataclass(frozen=True)
class ModelRef:
    """A model the workers can load without network: the name the user gave and a local path."""

    name: str
    path: str

    def fingerprint(self) -> str:
        """Hash of the model's files (names, sizes, and the content of its small config files)."""
        h = hashlib.sha256()
        root = Path(self.path)
        for f in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts):
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}\n".encode())
            if st.st_size < 1 << 20 and f.suffix in (".json", ".txt"):
                h.update(f.read_bytes())
        return h.hexdigest()[:16]


def resolve_model(model: str | None) -> ModelRef:
    """Local path, cached Hugging Face name, or the bundled default; RnbError if none applies."""
    if model is None:
        path = default_model_path()
        return ModelRef("all-MiniLM-L6-v2", str(path))
    p = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or os.sep + os.sep in model or p.exists() \
        or model.count("/") > 1
    if p.exists():
        if not p.is_dir() or not ((p / "modules.json").exists() or (p / "config.json").exists()):
            raise RnbError(f"model path {p} is not a sentence-transformers model directory", where=str(p),
                           fix="point --model at a directory with modules.json/config.json, or a model name")
        return ModelRef(model, str(p.absolute()))
    if looks_like_path:
        raise RnbError(f"model path {p} does not exist", where=str(p),
                       fix="pass an existing model directory, a Hugging Face model name, or omit --model")
    try:  # a hub name: use the local cache (workers must not need the network)
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, local_files_only=True)
        return ModelRef(model, local)
    except Exception as e:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise RnbError(
                f"model {model!r} is neither a local directory nor in the Hugging Face cache, and the hub is "
                "offline (HF_HUB_OFFLINE)",
                where=model,
                fix="download it once where the hub is reachable, or pass a local model directory",
            ) from e
        try:
            from huggingface_hub import snapshot_download

            return ModelRef(model, snapshot_download(model))
        except Exception as e2:
            raise RnbError(f"model {model!r} could not be found or downloaded: {e2}", where=model,
                           fix="check the name, or pass a local model directory") from e2


def load_model(path: str, threads: int | None = None, max_seq_length: int | None = None, device: str = "cpu",
               precision: str = "fp32"):
    """A SentenceTransformer from a local path, with torch limited to ``threads`` threads.

    ``device`` "cuda" puts it on the GPU Ray gave the actor; ``precision`` fp16/bf16 casts its weights there.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # transformers prints a progress bar per weight load; one per actor is noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if threads is not None:
        torch.set_num_threads(threads)
    if device != "cpu" and not torch.cuda.is_available():
        raise RnbError(f"this embedding actor was given a GPU by Ray but torch sees none (torch {torch.__version__}, "
                       f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})",
                       fix="install a CUDA build of torch on the GPU nodes, or drop --embed-gpus")
    model = SentenceTransformer(path, device=device, local_files_only=True)
    if precision == "fp16":
        model.half()
    elif precision == "bf16":
        model.to(torch.bfloat16)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def embedding_dim(model) -> int:
    """Output dimension (``get_embedding_dimension`` in sentence-transformers ≥ 5, older name before)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def is_empty(texts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Null, empty or whitespace-only texts."""
    import pyarrow.compute as pc

    stripped = pc.utf8_trim_whitespace(texts)
    empty = pc.or_kleene(pc.is_null(texts), pc.equal(pc.utf8_length(stripped), 0))
    return np.asarray(empty.to_numpy(zero_copy_only=False), dtype=bool) | np.asarray(
        pc.is_null(empty).to_numpy(zero_copy_only=False), dtype=bool)


def embeddings_array(E: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 → arrow fixed_size_list<float32>[d] (zero-copy)."""
    E = np.ascontiguousarray(E, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(E.reshape(-1)), E.shape[1])


def embeddings_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """arrow fixed_size_list<float32>[d] → (n, d) float32 (zero-copy when one chunk)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    d = col.type.list_size
    values = col.flatten() if col.offset else col.values
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)


DEFAULT_MAX_TOKENS = 1024  # padded tokens per forward pass; 512–1024 were fastest for MiniLM on 1 CPU thread


def length_batches(lengths: np.ndarray, max_docs: int, max_tokens: int) -> list[np.ndarray]:
    """Group positions into forward passes of similar length, longest first.

    ``lengths[i]`` is text ``i``'s token count. Positions are ordered by length (descending; ties keep input
    order) and cut into consecutive groups of at most ``max_docs`` positions whose padded size (group size ×
    its longest length) is at most ``max_tokens``; a text longer than ``max_tokens`` gets a group of its own.
    Every position appears in exactly one group.
    """
    if max_docs < 1 or max_tokens < 1:
        raise ValueError(f"max_docs and max_tokens must be at least 1, got {max_docs}, {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)  # descending: the first of a group is its longest
        size = max(1, min(max_docs, max_tokens // longest, n - start))
        groups.append(order[start:start + size])
        start += size
    return groups


def token_lengths(model, texts: list[str]) -> np.ndarray:
    """Tokens per text as the model will see them (special tokens included, truncated to its limit)."""
    limit = model.max_seq_length
    enc = model.tokenizer(texts, add_special_tokens=True, truncation=limit is not None, max_length=limit,
                          return_attention_mask=False, return_token_type_ids=False)
    return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))


def encode_by_length(model, texts: list[str], batch_size: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> np.ndarray:
    """L2-normalised float32 embeddings of ``texts`` in input order, computed in length-sorted passes."""
    E = np.zeros((len(texts), embedding_dim(model)), dtype=np.float32)
    if not texts:
        return E
    for group in length_batches(token_lengths(model, texts), batch_size, max_tokens):
        E[group] = model.encode([texts[i] for i in group], batch_size=len(group), normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
    return E


class Embedder:
    """Ray Data callable class: adds an ``embedding`` column (and an empty-text flag) to each batch.

    ``batch_size`` and ``max_tokens`` bound each forward pass (documents, padded tokens); the Ray Data batch
    handed to ``__call__`` can be larger, and the larger it is the closer in length each pass's texts are.
    """

    def __init__(self, model_path: str, text_column: str, threads: int = 1, batch_size: int = 128,
                 max_seq_length: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, backend: str = "torch",
                 backend_path: str | None = None, device: str = "cpu", precision: str = "fp32"):
        self.backend = backend
        if backend == "torch":
            self.model = load_model(model_path, threads, max_seq_length, device, precision)
        elif backend in ("onnx", "onnx-int8"):
            from rnb_ray.regroup.encoders import OnnxEncoder

            self.model = OnnxEncoder(str(backend_path), threads, max_seq_length)
        elif backend == "static":
            from rnb_ray.regroup.encoders import StaticEncoder

            self.model = StaticEncoder(str(backend_path), max_seq_length)
        else:
            raise RnbError(f"unknown embedding backend {backend!r}", where="--embed-backend")
        self.text_column = text_column
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.dim = embedding_dim(self.model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column)
        empty = is_empty(texts)
        E = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        keep = np.flatnonzero(~empty)
        if len(keep):
            values = texts.take(pa.array(keep)).to_pylist()
            E[keep] = self.encode(values)
        batch = batch.append_column(EMBEDDING, embeddings_array(E))
        return batch.append_column(EMPTY, pa.array(empty, pa.bool_()))

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-normalised embeddings of non-empty texts, in their order (length-sorted passes inside)."""
        if self.backend == "static":  # no padding to save: one pass over the whole batch
            return self.model.encode(texts)
        return encode_by_length(self.model, texts, self.batch_size, self.max_tokens)


def embedding_settings(model: ModelRef, max_seq_length: int | None) -> dict:
    """Everything that changes embedding values (and so the cache key)."""
    return {"model": model.name, "model_fingerprint": model.fingerprint(), "max_seq_length": max_seq_length,
            "normalize": True, "dtype": "float32"}


def settings_key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]
