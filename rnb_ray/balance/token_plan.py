"""The training data plan for pre-tokenised shards (``rnb train --data TOK_OUT``) and each worker's packers.

``prepare_token_plan`` runs on the driver: it reads ``tokens.json`` and only the shards' ``.idx`` files
(document sizes, memory-mapped), checks the shards against their index and the manifest and the run's
tokenizer against the one the shards were written with, and decides the held-out split per document with
``balance/split.py`` — ``is_heldout(source_key(<shard path relative to TOK_OUT>), <document number>, seed,
eval_fraction)`` — keeping only counts: the plan holds shard names and numbers, no per-document lists, so
its size does not grow with the corpus.

Each worker (``token_worker_data``) applies the same split to each shard, takes every ``world``-th training
document of each domain (all of them when a domain has fewer documents than workers) and packs them
(``balance/packing.py``): a ``Packer`` per domain, reshuffled every epoch with a seed of (run seed, rank,
domain), its position in the worker's sampler state — checkpointed, so ``--resume`` is exact.

Evaluation sequences are *packed* too: each domain's held-out documents (or, with ``--eval-data TOK_OUT2``, that
directory's documents of the domain), concatenated in shard order and cut into at most
``eval_max_per_domain`` sequences of ``seq_len`` tokens, split across workers. Mixture sizes and q are
counted in tokens (training tokens per domain; held-out tokens per domain).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.packing import Packer, pack_sequences
from rnb_ray.balance.split import is_heldout, source_key
from rnb_ray.errors import RnbError
from rnb_ray.tokens.indexed import Shard, read_sizes
from rnb_ray.tokens.shards import TokenDir, check_tokenizer, is_token_dir, open_checked, open_token_dir


@dataclass(frozen=True)
class DomainShards:
    """One domain's shards in one token directory: (relative path, documents) in order."""

    root: str
    shards: tuple[tuple[str, int], ...]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([n for _, n in self.shards])]).astype(np.int64)


@dataclass
class TokenPlan:
    """What workers need to pack their sequences; plain data (pickles into the train loop config)."""

    domains: list[str]
    sizes: np.ndarray  # training tokens per domain
    eval_sizes: np.ndarray  # evaluation tokens per domain (before the per-domain cap)
    q: np.ndarray
    q_source: str
    train: list[DomainShards]
    eval: list[DomainShards | None]  # None: the domain's held-out documents of ``train``
    seed: int
    eval_fraction: float  # 0 with --eval-data
    seq_len: int
    eval_max_per_domain: int
    doc_counts: np.ndarray  # training documents per domain
    warnings: list[str] = field(default_factory=list)
    static_weights: np.ndarray | None = None

    @property
    def m(self) -> int:
        return len(self.domains)


def is_token_data(path: str | None) -> bool:
    return path is not None and is_token_dir(path)


def _domain_shards(td: TokenDir, i: int) -> DomainShards:
    return DomainShards(str(td.root), tuple((rel, td.counts[rel]) for rel in td.shards[i]))


def _heldout(rel: str, n: int, seed: int, fraction: float) -> np.ndarray:
    return is_heldout(source_key(rel), np.arange(n, dtype=np.int64), seed, fraction)


def prepare_token_plan(cfg: TrainConfig) -> TokenPlan:
    """Open and check the shards, compare tokenizers, count the split (driver side, before Ray work)."""
    from rnb_ray.balance.lm import load_tokenizer, tokenizer_source
    from rnb_ray.balance.plan import load_static_weights, mixture_target
    from rnb_ray.tokens.encode import tokenizer_info

    if cfg.category_column is not None:
        raise RnbError("--category-column is not available with token shards (they keep no other column)",
                       where="--category-column", fix="drop --category-column, or train on the raw corpus")
    td = open_token_dir(cfg.data, "--data")
    info = tokenizer_info(load_tokenizer(cfg.model, cfg.tokenizer), tokenizer_source(cfg.model, cfg.tokenizer))
    check_tokenizer(td, info, "--data")
    fraction = 0.0 if cfg.eval_data is not None else cfg.eval_fraction
    train = [_domain_shards(td, i) for i in range(len(td.domains))]
    sizes, eval_sizes, docs = (np.zeros(len(train), dtype=np.int64) for _ in range(3))
    for d, ds in enumerate(train):
        for rel, n in ds.shards:
            shard_sizes = read_sizes(td.root / rel)  # document lengths, read and dropped shard by shard
            held = _heldout(rel, n, cfg.seed, fraction)
            sizes[d] += int(shard_sizes[~held].sum())
            eval_sizes[d] += int(shard_sizes[held].sum())
            docs[d] += int((~held).sum())
        if docs[d] == 0:
            raise RnbError(f"domain {td.domains[d]} has no training documents (all {sum(n for _, n in ds.shards)} "
                           "are held out)", where=str(td.root / f"domain={td.domains[d]}"),
                           fix="lower --eval-fraction, or regroup into fewer, larger domains")
    warnings: list[str] = []
    evals: list[DomainShards | None] = [None] * len(train)
    if cfg.eval_data is not None:
        if not is_token_data(cfg.eval_data):
            raise RnbError(f"--eval-data {cfg.eval_data} is not a token-shard directory, but --data is",
                           where="--eval-data", fix="tokenize the evaluation set with `rnb tokenize` and the same "
                           "tokenizer, or train on the raw corpus")
        ed = open_token_dir(cfg.eval_data, "--eval-data")
        check_tokenizer(ed, info, "--eval-data")
        unknown = sorted(set(ed.domains) - set(td.domains))
        if unknown:
            warnings.append(f"evaluation domains absent from training are ignored: {unknown}")
        for d, name in enumerate(td.domains):
            if name in ed.domains:
                evals[d] = _domain_shards(ed, ed.domains.index(name))
                eval_sizes[d] = int(ed.manifest["by_domain"][name]["tokens"])
    q, q_source = mixture_target(cfg, sizes, eval_sizes, unit="documents")
    if len(td.domains) < 2:
        raise RnbError(f"the token shards have {len(td.domains)} domain(s); mixing needs at least 2",
                       where=cfg.data, fix="regroup into more domains (k >= 2)")
    if cfg.floor * len(td.domains) >= 1.0:
        raise RnbError(f"floor {cfg.floor} is too large for {len(td.domains)} domains", where="--floor",
                       fix=f"use floor < 1/m = {1 / len(td.domains):.4g}")
    plan = TokenPlan(domains=list(td.domains), sizes=sizes, eval_sizes=eval_sizes, q=q, q_source=q_source,
                     train=train, eval=evals, seed=cfg.seed, eval_fraction=fraction, seq_len=cfg.seq_len,
                     eval_max_per_domain=cfg.eval_max_per_domain, doc_counts=docs, warnings=warnings)
    if cfg.strategy == "static":
        plan.static_weights = load_static_weights(cfg.static_weights or "", plan.domains)
    return plan


# ---------------------------------------------------------------------------------------------- workers
class ShardCache:
    """The shards a worker has open (memory maps hold a file descriptor each): the ``max_open`` most recently
    used, shared by all of the worker's domains."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._open: OrderedDict[tuple[str, str], Shard] = OrderedDict()

    def get(self, root: str, rel: str) -> Shard:
        key = (root, rel)
        s = self._open.get(key)
        if s is None:
            s = self._open[key] = open_checked(Path(root), rel)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(key)
        return s


class ShardReader:
    """A worker's documents of one domain by number (0 … total-1 across its shards, in order)."""

    def __init__(self, ds: DomainShards, cache: ShardCache):
        self.ds, self.offsets, self.cache = ds, ds.offsets, cache

    def shard(self, i: int) -> Shard:
        return self.cache.get(self.ds.root, self.ds.shards[i][0])

    def __call__(self, doc: int) -> np.ndarray:
        i = int(np.searchsorted(self.offsets, doc, side="right")) - 1
        return self.shard(i).document(doc - int(self.offsets[i]))

    def split(self, seed: int, fraction: float, rank: int, world: int, max_heldout: int, n_train: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(this worker's training documents, the first ``max_heldout`` held-out documents) of the domain, in
        order, decided shard by shard (memory: this worker's share, not the domain). The worker takes every
        ``world``-th training document of the domain — all of them when the domain has fewer (``n_train``, from
        the plan) than ``world``."""
        mine, held, seen, n_held = [], [], 0, 0
        for (rel, n), off in zip(self.ds.shards, self.offsets[:-1], strict=True):
            mask = _heldout(rel, n, seed, fraction)
            numbers = off + np.arange(n, dtype=np.int64)
            train = numbers[~mask]
            if n_train < world:
                mine.append(train)
            else:
                mine.append(train[(seen + np.arange(len(train))) % world == rank])
            seen += len(train)
            if n_held < max_heldout:
                h = numbers[mask][: max_heldout - n_held]
                held.append(h)
                n_held += len(h)
        empty = np.zeros(0, dtype=np.int64)
        return (np.concatenate(mine) if mine else empty), (np.concatenate(held) if held else empty)


def token_worker_data(plan: TokenPlan, rank: int, world: int, seed: int
                      ) -> tuple[list[Packer], list[list[np.ndarray]]]:
    """This worker's packer per domain, and its share of each domain's evaluation sequences."""
    packers, evals = [], []
    cache = ShardCache()
    for d, ds in enumerate(plan.train):
        reader = ShardReader(ds, cache)
        # Every document has >= 1 token (EOS), so this many held-out documents fill the evaluation cap.
        cap_docs = plan.eval_max_per_domain * plan.seq_len
        mine, held = reader.split(plan.seed, plan.eval_fraction, rank, world, cap_docs, int(plan.doc_counts[d]))
        packers.append(Packer(mine, plan.seq_len, seed=seed * 7919 + rank * 131 + d, fetch=reader))
        if plan.eval[d] is not None:
            ereader = ShardReader(plan.eval[d], cache)
            eval_docs = np.arange(min(int(ereader.offsets[-1]), cap_docs), dtype=np.int64)
        else:
            ereader, eval_docs = reader, held
        seqs = pack_sequences(_documents(ereader, eval_docs), plan.seq_len, plan.eval_max_per_domain)
        evals.append(seqs[rank::world])
    return packers, evals


def _documents(reader: ShardReader, docs: np.ndarray) -> Iterator[np.ndarray]:
    for doc in docs:
        yield reader(int(doc))
