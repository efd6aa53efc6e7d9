"""The held-out split of a Balance run, decided per document from a stable id (pure numpy, no IO).

A document is held out for evaluation when ``hash(id, seed) < fraction``: no list of row numbers is kept
anywhere, every worker can apply the split while it streams, and the split of a document does not depend
on how the corpus is cut into files, row groups or workers. The id of a document is
``doc_ids(source_key, rows)``: a 64-bit hash of its source (a file's path relative to the data root, or a
token shard's name) combined with its position in that source.
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLIT_SALT = 7_368_787  # the split must not correlate with k-means seeding or the sweep's held-out set


def source_key(name: str) -> int:
    """A stable 63-bit integer for a source name (e.g. ``"domain=3/part-0.parquet"``)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def hash_uniform(ids: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) number per id (splitmix64)."""
    z = np.asarray(ids).astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def doc_ids(source: int, rows: np.ndarray) -> np.ndarray:
    """The stable id of rows ``rows`` (positions within the source) of source ``source_key(name)``."""
    with np.errstate(over="ignore"):
        return np.uint64(source) * np.uint64(0x100000001B3) + np.asarray(rows).astype(np.uint64)


def is_heldout(source: int, rows: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Boolean mask: which of ``rows`` of a source are held out for evaluation."""
    if fraction <= 0:
        return np.zeros(len(rows), dtype=bool)
    return hash_uniform(doc_ids(source, rows), seed + SPLIT_SALT) < fraction
