"""Packing: one domain's documents concatenated and cut into sequences of exactly ``seq_len`` tokens (pure
numpy; no IO, no Ray — reading a document is injected as ``fetch``).

Documents already end with EOS (``rnb tokenize`` appends it), so concatenation keeps every boundary: a
sequence is ``doc_a[i:] EOS doc_b EOS doc_c[:j]``, no padding, the attention mask all ones and the loss over
every next-token target. A document longer than what is left of a sequence continues at the start of the
next one (nothing is dropped). Attention is not reset at EOS (as in GPT-2/Megatron pretraining).

``Packer`` is one domain's endless stream on one worker: its documents in a seeded order that changes every
epoch (``seed``, ``epoch``), read one after another. Its state is three integers — epoch, position in the
epoch's order, tokens already used of the current document — so checkpoints are tiny and restoring one
replays the same sequences. It has ``next()``/``state_dict()``/``load_state_dict()``/``len()`` like the
raw-text ``DomainStream``, so the same ``DomainSampler`` draws each sequence's domain from p and a batch
sorted by domain still gives contiguous per-domain groups (one domain per sequence).

``pack_sequences`` cuts a fixed list of documents once, in order (the evaluation sequences).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

Fetch = Callable[[int], np.ndarray]  # document number -> its tokens (EOS included)


class Packer:
    """Endless, seeded, checkpointable sequences of ``seq_len`` tokens from one domain's documents."""

    def __init__(self, docs: np.ndarray, seq_len: int, seed: int, fetch: Fetch):
        self.docs = np.asarray(docs, dtype=np.int64)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.fetch = fetch
        self.epoch = self.pos = self.offset = 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.docs)

    def order(self) -> np.ndarray:
        """This epoch's document order (a permutation of ``docs``)."""
        if self._order is None or self._order[0] != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.docs))
            self._order = (self.epoch, self.docs[perm])
        return self._order[1]

    def next(self) -> np.ndarray:
        """The next sequence: exactly ``seq_len`` tokens (int64)."""
        if not len(self.docs):
            raise ValueError("this domain has no documents on this worker")
        out = np.empty(self.seq_len, dtype=np.int64)
        filled, empty_run = 0, 0
        while filled < self.seq_len:
            tokens = self.fetch(int(self.order()[self.pos]))
            take = min(len(tokens) - self.offset, self.seq_len - filled)
            if take > 0:
                out[filled: filled + take] = tokens[self.offset: self.offset + take]
                filled += take
                self.offset += take
                empty_run = 0
            else:
                empty_run += 1
                if empty_run > len(self.docs):
                    raise ValueError("every document of this domain is empty")
            if self.offset >= len(tokens):
                self.offset, self.pos = 0, self.pos + 1
                if self.pos == len(self.docs):  # ran out: a new epoch, a new order
                    self.pos, self.epoch = 0, self.epoch + 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self.offset = int(state["epoch"]), int(state["pos"]), int(state["offset"])


def pack_sequences(documents: Iterable[np.ndarray], seq_len: int, max_sequences: int) -> list[np.ndarray]:
    """Concatenate ``documents`` in order and cut the first ``max_sequences`` sequences of ``seq_len`` tokens;
    the tail shorter than ``seq_len`` is dropped, unless there is no full sequence at all (then the one
    shorter sequence is kept, when it has at least two tokens — one next-token target)."""
    out: list[np.ndarray] = []
    buf: list[np.ndarray] = []
    have = 0
    for doc in documents:
        buf.append(np.asarray(doc, dtype=np.int64))
        have += len(doc)
        while have >= seq_len and len(out) < max_sequences:
            flat = np.concatenate(buf)
            out.append(flat[:seq_len])
            buf, have = [flat[seq_len:]], len(flat) - seq_len
        if len(out) >= max_sequences:
            return out
    if not out and have >= 2:
        out.append(np.concatenate(buf))
    return out
