"""What an embedding actor runs for the ``onnx``, ``onnx-int8`` and ``static`` backends (``backends.py`` makes them).

``OnnxEncoder`` has the part of ``SentenceTransformer``'s interface that ``embed.encode_by_length`` uses
(``tokenizer``, ``max_seq_length``, ``encode``, ``get_embedding_dimension``), so ONNX backends get the same
length-sorted forward passes as torch. ``StaticEncoder`` needs no passes: a document's vector is the mean of
its tokens' rows, computed for the whole batch at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

META = "rnb-backend.json"


def _normalise(E: np.ndarray) -> np.ndarray:
    E = np.asarray(E, dtype=np.float32)
    norms = np.linalg.norm(E, axis=1, keepdims=True)
    return E / np.maximum(norms, 1e-12)


class OnnxEncoder:
    """An exported sentence-transformers model in ONNX Runtime, on ``threads`` CPU threads."""

    def __init__(self, path: str, threads: int | None = 1, max_seq_length: int | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import onnxruntime as ort
        from transformers import AutoTokenizer

        root = Path(path)
        meta = json.loads((root / META).read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
        self.session = ort.InferenceSession(str(root / meta["file"]), opts, providers=["CPUExecutionProvider"])
        self.inputs = list(meta["inputs"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        self.max_seq_length = max_seq_length or meta["max_seq_length"]
        self.dim = int(meta["dim"])

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts: list[str], batch_size: int = 32, normalize_embeddings: bool = True, **_) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=self.max_seq_length,
                                 return_tensors="np")
            out[i:i + batch_size] = self.session.run(None, {n: enc[n].astype(np.int64) for n in self.inputs})[0]
        return _normalise(out) if normalize_embeddings else out


class StaticEncoder:
    """A model2vec static model: tokens → rows of one matrix → mean → unit length."""

    def __init__(self, path: str, max_seq_length: int | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from model2vec import StaticModel

        meta = json.loads((Path(path) / META).read_text(encoding="utf-8"))
        self.model = StaticModel.from_pretrained(path)
        # the source model's truncation, so --max-seq-length means the same for every backend
        self.max_seq_length = max_seq_length or meta["max_seq_length"]
        self.dim = int(meta["dim"])

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts: list[str], **_) -> np.ndarray:
        E = self.model.encode(texts, max_length=self.max_seq_length, batch_size=max(1, len(texts)),
                              show_progress_bar=False, use_multiprocessing=False)
        return _normalise(E)
