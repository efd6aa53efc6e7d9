"""The domain sampler: each example of a batch draws its domain from p, then takes the next example of that
domain from this worker's own stream (no Ray, no IO: reading is injected as a ``UnitLoader``).

A worker's stream for a domain is a list of *units* (a parquet row group or a jsonl file, with what the loader
needs to pick this worker's rows of this domain in it). Every epoch the stream visits its units in a seeded
order and reads them sequentially; what it reads passes through a *shuffle buffer*: the next ``buffer``
examples are read as one block, permuted by an RNG seeded with (seed, epoch, block), and handed out in that
order. A domain that runs out starts a new epoch (a new unit order, new permutations).

Memory is one block per domain (``buffer`` texts), whatever the corpus size. The state is five integers per
domain — ``epoch``, the block's start (``unit_pos`` in this epoch's order, ``row`` within that unit), the
block's number (``block``, which seeds its permutation: the buffer's RNG state) and how many of its examples
were handed out (``offset``) — plus the domain-draw RNG. Restoring re-reads that one block and skips
``offset`` examples, so a resumed run draws exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

# (unit, first row) -> the unit's examples for this stream from row ``first row`` on, in row order, as batches
# of (row positions within the unit, texts). Must be deterministic: restoring re-reads a block.
UnitLoader = Callable[[Hashable, int], Iterable[tuple[Sequence[int], list[str]]]]

DEFAULT_BUFFER = 2048


class DomainStream:
    """Endless, seeded, checkpointable stream of one domain's examples on one worker."""

    def __init__(self, units: Sequence[Hashable], seed: int, loader: UnitLoader, buffer: int = DEFAULT_BUFFER):
        if buffer < 1:
            raise ValueError(f"shuffle buffer must be >= 1, not {buffer}")
        self.units = list(units)
        self.seed = int(seed)
        self.loader = loader
        self.buffer = int(buffer)
        self.epoch = self.unit_pos = self.row = self.block = self.offset = 0
        self._texts: list[str] | None = None  # the current block, permuted
        self._next: tuple[int, int] | None = None  # where the block after it starts (None: the epoch ended)
        self._reader: Iterator[tuple[int, int, str]] | None = None  # live sequential read, positioned at _next

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))

    def _records(self, unit_pos: int, row: int) -> Iterator[tuple[int, int, str]]:
        """(unit position, row, text) from (unit_pos, row) to the end of this epoch's read order."""
        order = self._order()
        for pos in range(unit_pos, len(self.units)):
            for rows, texts in self.loader(self.units[int(order[pos])], row if pos == unit_pos else 0):
                for r, t in zip(rows, texts, strict=True):
                    yield pos, int(r), t

    def _fill(self) -> None:
        """Read the block that starts at (unit_pos, row) and permute it."""
        if self._reader is None or self._next != (self.unit_pos, self.row):
            self._reader = self._records(self.unit_pos, self.row)
        texts: list[str] = []
        end: tuple[int, int] | None = None
        for pos, r, t in self._reader:
            texts.append(t)
            end = (pos, r + 1)
            if len(texts) == self.buffer:
                break
        else:
            self._reader = None  # the epoch's read order is exhausted
        self._next = end if self._reader is not None else None
        perm = np.random.default_rng([self.seed, self.epoch, self.block, 1]).permutation(len(texts))
        self._texts = [texts[i] for i in perm]

    def next(self) -> str:
        if not self.units:
            raise ValueError("this domain has no examples on this worker")
        while True:
            if self._texts is None:
                self._fill()
            assert self._texts is not None
            if self.offset < len(self._texts):
                self.offset += 1
                return self._texts[self.offset - 1]
            if not self._texts and self.block == 0:
                raise ValueError("this domain has no examples on this worker")
            if self._next is None:  # ran out: a new epoch, in a new order
                self.epoch, self.unit_pos, self.row, self.block = self.epoch + 1, 0, 0, 0
            else:
                (self.unit_pos, self.row), self.block = self._next, self.block + 1
            self.offset, self._texts = 0, None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "unit_pos": self.unit_pos, "row": self.row, "block": self.block,
                "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "unit_pos" not in state:
            raise ValueError("the sampler state was written before streams had a shuffle buffer")
        self.epoch, self.unit_pos, self.row = int(state["epoch"]), int(state["unit_pos"]), int(state["row"])
        self.block, self.offset = int(state["block"]), int(state["offset"])
        self._texts, self._next, self._reader = None, None, None


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
