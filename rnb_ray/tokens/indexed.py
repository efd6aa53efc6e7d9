"""Megatron-LM's indexed dataset (``MMapIndexedDataset``): one token shard as a ``.bin``/``.idx`` pair (numpy
and files only; no Ray, no torch).

Why this format: it is the one the large pretraining stacks read natively (Megatron-LM / Megatron-Core
``IndexedDataset``, NeMo, GPT-NeoX, Megatron-DeepSpeed, OLMo's tools convert from it), it is two flat files a
reader memory-maps without parsing (a document is a slice of ``.bin`` found by two array lookups), and it is
documented by its reference implementation (``megatron/core/datasets/indexed_dataset.py``, ``_IndexWriter``):

``PREFIX.bin``  every document's tokens, concatenated, little-endian, dtype as in the header.

``PREFIX.idx``  little-endian::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    u64       sequence count S
    u64       document count D (= number of documents + 1)
    i32[S]    sequence lengths, in tokens
    i64[S]    sequence pointers: byte offset of each sequence in .bin
    i64[D]    document index: 0, then the sequence count at the end of each document

rnb-ray writes one sequence per document (document index = 0, 1, …, S), tokens ``uint16`` when the vocabulary
has fewer than 65,500 entries (Megatron's ``DType.optimal_dtype`` rule) and ``int32`` otherwise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34


class ShardError(ValueError):
    """A shard that is not a valid indexed dataset (the message says what is wrong)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65,500 tokens, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def write_shard(prefix: str | Path, documents: list[np.ndarray], dtype: np.dtype | type) -> tuple[int, int]:
    """Write ``PREFIX.bin`` and ``PREFIX.idx`` holding ``documents`` (one sequence each, in order); returns
    (documents, tokens). The caller makes it atomic (it writes into a temporary directory)."""
    dtype = np.dtype(dtype)
    prefix = Path(prefix)
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
        raise ShardError("a document is longer than 2^31 tokens")
    flat = np.concatenate(documents) if documents else np.zeros(0, dtype=dtype)
    if flat.dtype != dtype and len(flat):
        info = np.iinfo(dtype) if dtype.kind in "iu" else None
        if info is not None and (flat.min() < info.min or flat.max() > info.max):
            raise ShardError(f"token ids outside {dtype.name}: {flat.min()}..{flat.max()}")
    flat.astype(dtype.newbyteorder("<"), copy=False).tofile(prefix.with_suffix(".bin"))
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1]) * dtype.itemsize
    doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_index)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_index.astype("<i8").tobytes())
    return len(lengths), int(lengths.sum())


@dataclass
class Shard:
    """A shard opened for reading: the index arrays and the tokens, memory-mapped (nothing read up front)."""

    prefix: Path
    dtype: np.dtype
    sizes: np.ndarray  # (S,) int32
    pointers: np.ndarray  # (S,) int64, bytes
    doc_index: np.ndarray  # (D,) int64
    tokens: np.ndarray  # memmap of .bin

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start: start + int(self.sizes[i])]


def read_header(idx_path: Path) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document-index length) from an ``.idx`` header; ShardError if invalid."""
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise ShardError("not a Megatron indexed-dataset index (bad magic)")
    version, code, s, d = struct.unpack("<QBQQ", head[len(MAGIC):])
    if version != VERSION:
        raise ShardError(f"index version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise ShardError(f"unknown dtype code {code}")
    return np.dtype(DTYPE_CODES[code]), int(s), int(d)


def _layout(prefix: Path) -> tuple[Path, Path, np.dtype, int, int]:
    idx, binf = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    if not idx.is_file() or not binf.is_file():
        raise ShardError(f"missing {idx.name if not idx.is_file() else binf.name}")
    dtype, s, d = read_header(idx)
    expected = HEADER_BYTES + 4 * s + 8 * s + 8 * d
    if idx.stat().st_size < expected:
        raise ShardError(f"index truncated: {idx.stat().st_size} bytes, the header promises {expected}")
    return idx, binf, dtype, s, d


def _check_bin(binf: Path, dtype: np.dtype, n_tokens: int) -> None:
    bin_bytes = binf.stat().st_size
    if bin_bytes != n_tokens * dtype.itemsize:
        raise ShardError(f"{binf.name} holds {bin_bytes} bytes, its index says {n_tokens * dtype.itemsize} "
                         f"({n_tokens} tokens of {dtype.name})")


def check_shard(prefix: str | Path) -> tuple[int, int]:
    """(documents, tokens) of ``PREFIX.{bin,idx}``, checked as ``open_shard`` checks it, reading only the header
    and the last entries (O(1), nothing left open: a driver can check thousands of shards)."""
    idx, binf, dtype, s, _ = _layout(Path(prefix))
    n_tokens = 0
    if s:
        last_size = np.fromfile(idx, dtype="<i4", count=1, offset=HEADER_BYTES + 4 * (s - 1))[0]
        last_ptr = np.fromfile(idx, dtype="<i8", count=1, offset=HEADER_BYTES + 4 * s + 8 * (s - 1))[0]
        n_tokens = int(last_ptr) // dtype.itemsize + int(last_size)
    _check_bin(binf, dtype, n_tokens)
    return s, n_tokens


def read_sizes(prefix: str | Path) -> np.ndarray:
    """The document lengths of a shard (int64), read into memory (the index file is not kept open)."""
    idx = Path(prefix).with_suffix(".idx")
    _, s, _ = read_header(idx)
    return np.fromfile(idx, dtype="<i4", count=s, offset=HEADER_BYTES).astype(np.int64)


def open_shard(prefix: str | Path) -> Shard:
    """Open ``PREFIX.{bin,idx}`` memory-mapped (one map per file), checking the index against itself and against
    the size of ``.bin``."""
    idx, binf, dtype, s, d = _layout(Path(prefix))
    raw = np.memmap(idx, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(raw, dtype="<i4", count=s, offset=HEADER_BYTES)
    pointers = np.frombuffer(raw, dtype="<i8", count=s, offset=HEADER_BYTES + 4 * s)
    doc_index = np.frombuffer(raw, dtype="<i8", count=d, offset=HEADER_BYTES + 12 * s)
    n_tokens = int(pointers[-1]) // dtype.itemsize + int(sizes[-1]) if s else 0
    _check_bin(binf, dtype, n_tokens)
    tokens = np.memmap(binf, dtype=dtype.newbyteorder("<"), mode="r") if n_tokens else np.zeros(0, dtype)
    return Shard(Path(prefix), dtype, sizes, pointers, doc_index, tokens)
