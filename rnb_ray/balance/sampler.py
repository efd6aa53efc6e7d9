"""The domain sampler: each example of a batch draws its domain from p, then takes the next example of that
domain from this worker's own stream (no Ray; reading is injected as a ``ChunkLoader``).

A worker's stream for a domain is a list of *chunks* (a parquet row group, or a jsonl file) with the row
numbers this worker owns in each. Streams read one chunk at a time, in a seeded order that changes every
epoch, rows shuffled within the chunk; a domain that runs out is reshuffled and restarted (a new epoch).
Everything is a function of (seed, epoch, position), so the state is three integers per domain plus the
domain-draw RNG — small enough for every checkpoint, and restoring it replays the same examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ChunkLoader = Callable[[int, np.ndarray], list[str]]  # (chunk key, row numbers) -> texts in that order


@dataclass(frozen=True)
class Chunk:
    key: int  # which file/row group (the loader knows)
    rows: np.ndarray  # row numbers within the chunk that this worker trains on, for this domain


class DomainStream:
    """Endless, seeded, checkpointable stream of one domain's examples on one worker."""

    def __init__(self, chunks: list[Chunk], seed: int, loader: ChunkLoader):
        self.chunks = [c for c in chunks if len(c.rows)]
        self.seed = int(seed)
        self.loader = loader
        self.epoch = 0
        self.chunk_pos = 0
        self.row_pos = 0
        self._texts: list[str] | None = None

    def __len__(self) -> int:
        return int(sum(len(c.rows) for c in self.chunks))

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.chunks))

    def _load(self) -> list[str]:
        chunk = self.chunks[int(self._order()[self.chunk_pos])]
        perm = np.random.default_rng([self.seed, self.epoch, self.chunk_pos, 1]).permutation(len(chunk.rows))
        return self.loader(chunk.key, chunk.rows[perm])

    def next(self) -> str:
        if not self.chunks:
            raise ValueError("this domain has no examples on this worker")
        while True:
            if self._texts is None:
                self._texts = self._load()
            if self.row_pos < len(self._texts):
                self.row_pos += 1
                return self._texts[self.row_pos - 1]
            self._texts, self.row_pos = None, 0
            self.chunk_pos += 1
            if self.chunk_pos == len(self.chunks):  # ran out: reshuffle and restart
                self.chunk_pos, self.epoch = 0, self.epoch + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "chunk_pos": self.chunk_pos, "row_pos": self.row_pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.chunk_pos, self.row_pos = int(state["epoch"]), int(state["chunk_pos"]), int(state["row_pos"])
        self._texts = None


class DomainSampler:
    """Batches whose examples' domains are i.i.d. draws from the current mixture p."""

    def __init__(self, streams: list[DomainStream], seed: int):
        self.streams = streams
        self.rng = np.random.default_rng(int(seed))

    @property
    def num_domains(self) -> int:
        return len(self.streams)

    def draw(self, p: np.ndarray, n: int) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (self.num_domains,) or not np.all(np.isfinite(p)) or np.any(p < 0) or not p.sum() > 0:
            raise ValueError(f"invalid mixture {p!r} for {self.num_domains} domains")
        return self.rng.choice(self.num_domains, size=n, p=p / p.sum())

    def next_batch(self, p: np.ndarray, n: int) -> tuple[list[str], np.ndarray]:
        domains = self.draw(p, n)
        return [self.streams[d].next() for d in domains], domains

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError(f"sampler state has {len(state['streams'])} domains, this run has {len(self.streams)}")
        self.rng.bit_generator.state = state["rng"]
        for s, st in zip(self.streams, state["streams"], strict=True):
            s.load_state_dict(st)
