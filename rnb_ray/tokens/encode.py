"""Documents → token arrays with EOS appended, and the identity of a tokenizer (no Ray).

Each document is encoded without the tokenizer's own special tokens (no BOS/CLS/SEP around every text) and
gets the end-of-document token appended — as Megatron-LM's ``preprocess_data.py --append-eod`` does — so a
shard is self-contained and packing only concatenates. The end token is the tokenizer's EOS, else its SEP
(BERT-style tokenizers have no EOS), else the tokenizer cannot be used for packing.

``tokenizer_info`` is what ``tokens.json`` records and what training compares: the tokenizer's name or path,
class, vocabulary size, end token and a SHA-256 of its vocabulary (token → id, sorted).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from rnb_ray.errors import RnbError

BYTE_OFFSET = 3  # ByT5: ids 0-2 are pad, eos, unk; byte b is id b + 3


def eos_id(tok: Any, source: str) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    raise RnbError(f"tokenizer {source!r} has neither an EOS nor a SEP token to end documents with",
                   where="--tokenizer", fix="use a tokenizer with an end-of-sequence token")


def _is_byte_tokenizer(tok: Any) -> bool:
    return type(tok).__name__ == "ByT5Tokenizer" and len(tok) == 256 + BYTE_OFFSET


def encode_documents(tok: Any, texts: list[str], end: int) -> list[np.ndarray]:
    """Each text's token ids (int64) followed by ``end``. The byte tokenizer takes a numpy fast path that
    gives the ids ByT5Tokenizer gives (UTF-8 bytes + 3; texts are bytes, never special-token strings)."""
    if _is_byte_tokenizer(tok):
        out = []
        for t in texts:
            b = np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8)
            ids = np.empty(len(b) + 1, dtype=np.int64)
            ids[:-1] = b.astype(np.int64) + BYTE_OFFSET
            ids[-1] = end
            out.append(ids)
        return out
    enc = tok(texts, add_special_tokens=False, verbose=False, return_attention_mask=False,
              return_token_type_ids=False)["input_ids"]
    out = []
    for ids in enc:
        a = np.empty(len(ids) + 1, dtype=np.int64)
        a[:-1] = ids
        a[-1] = end
        out.append(a)
    return out


def vocab_sha256(tok: Any) -> str:
    vocab = sorted((str(k), int(v)) for k, v in tok.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def tokenizer_info(tok: Any, source: str) -> dict[str, Any]:
    return {"name": source, "class": type(tok).__name__, "vocab_size": len(tok), "eos_id": eos_id(tok, source),
            "vocab_sha256": vocab_sha256(tok)}
