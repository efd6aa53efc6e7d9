"""The training data plan of a Balance run: list the files, read the domain column, split, plan the streams.

Accepted ``--data`` (a local path, or an ``s3://``/``gs://`` URI read through pyarrow's filesystems): an
``rnb regroup`` output directory (``domains.json`` + ``data/domain-<id>/*.parquet``,
the domain taken from the column or from the hive path), or any parquet/jsonl file or directory of them
with a domain column (``domain_column``); the files are listed by :mod:`rnb_ray.files`. Domain names are the
string form of the values, ordered numerically when all are integers, else lexicographically.

``prepare_plan`` runs on the driver before any Ray work: it reads only the domain (and category) columns,
validates everything a user can get wrong, makes the held-out split, and returns a ``Plan`` — row numbers
per (file, row group) and domain — from which every worker builds its own streams (``worker_streams``) and
reads only its share of every domain's text, one row group at a time (``ChunkReader``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rnb_ray import files, storage
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.sampler import Chunk, DomainStream
from rnb_ray.balance.strategies.simple import check_weights
from rnb_ray.errors import RnbError

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".jsonl", ".json")  # what --data may hold


@dataclass(frozen=True)
class Source:
    """One readable unit: a parquet row group or a whole jsonl file."""

    path: str  # local path, or the path inside ``fs``
    row_group: int | None  # None: jsonl
    hive_domain: str | None = None  # value from a `<domain_column>=<v>` directory when the file lacks the column
    fs: Any = field(default=None, compare=False, repr=False)  # pyarrow filesystem of a URI; None: local

    @property
    def display(self) -> str:
        return storage.display_path(self.fs, self.path)


@dataclass
class Plan:
    """Everything workers need to build their streams; plain data (pickles into the train loop config)."""

    domains: list[str]
    sizes: np.ndarray  # training examples per domain
    eval_sizes: np.ndarray  # evaluation examples per domain (before the per-domain cap)
    q: np.ndarray  # evaluation proportions
    text_column: str
    sources: list[Source]
    train: list[list[tuple[int, np.ndarray]]]  # per domain: (source key, row numbers)
    eval: list[list[tuple[int, np.ndarray]]]  # per domain: capped evaluation rows
    q_source: str  # "eval_data" | "training proportions"
    warnings: list[str] = field(default_factory=list)
    static_weights: np.ndarray | None = None

    @property
    def m(self) -> int:
        return len(self.domains)


# ---------------------------------------------------------------------------------------------- files
def list_data(path: str, what: str = "--data") -> tuple[pafs.FileSystem | None, list[files.ListedFile]]:
    """The parquet/jsonl files of ``--data``/``--eval-data`` (a local path or a URI): one file, or those under a
    directory — the ``data/`` of an ``rnb regroup`` output (recognised by its ``domains.json``) —, and the
    filesystem they are in (None: local)."""
    loc = files.locate(path, what)
    if loc.kind == "file":
        if Path(loc.path).suffix not in SUFFIXES:
            raise RnbError(f"{loc.shown} is not a parquet or jsonl file", where=what,
                           fix="give .parquet or .jsonl data")
        return loc.fs, files.list_files(loc)
    if loc.kind == "missing":
        raise RnbError(f"{loc.shown} does not exist", where=what,
                       fix="check the path" if loc.fs is None else "check the URI")
    if loc.child("domains.json").kind == "file" and (data := loc.child("data")).kind == "dir":
        loc = data
    found = files.list_files(loc, suffixes=SUFFIXES)
    if not found:
        raise RnbError(f"no parquet or jsonl files under {loc.shown}", where=what,
                       fix="point --data at an `rnb regroup` output or at parquet/jsonl files")
    return loc.fs, found


def _name(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        if np.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def _order(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _scan(path: str, cfg: TrainConfig, what: str, need_category: bool
          ) -> tuple[list[Source], list[list[str | None]], list[list[str | None]]]:
    """Sources and, per source, each row's domain name (and category)."""
    fs, found = list_data(path, what)
    sources: list[Source] = []
    doms: list[list[str | None]] = []
    cats: list[list[str | None]] = []
    for listed in found:
        f = listed.shown
        if Path(listed.path).suffix == ".parquet":
            try:
                pf = pq.ParquetFile(files.pyarrow_source(fs, listed.path, random_access=True))
            except (pa.ArrowInvalid, OSError) as e:
                raise RnbError(f"cannot read parquet file {f}: {e}", where=what) from e
            names = pf.schema_arrow.names
            units = [(rg, pf.metadata.row_group(rg).num_rows) for rg in range(pf.num_row_groups)]
            read = lambda cols, rg, pf=pf: pf.read_row_group(rg, columns=cols)  # noqa: E731
        else:
            try:
                table = pajson.read_json(files.pyarrow_source(fs, listed.path))
            except (pa.ArrowInvalid, OSError) as e:
                raise RnbError(f"cannot read {f} as JSON lines: {e}", where=what,
                               fix="one JSON object per line") from e
            names = table.column_names
            units = [(None, table.num_rows)]
            read = lambda cols, rg, t=table: t.select(cols)  # noqa: E731
        if cfg.text_column not in names:
            raise RnbError(f"{f} has no text column {cfg.text_column!r} (columns: {', '.join(names)})",
                           where=what, fix="pass --text-column with the right name")
        hive = None if cfg.domain_column in names else files.hive_value(listed, cfg.domain_column)
        if cfg.domain_column not in names and hive is None:
            raise RnbError(f"{f} has no domain column {cfg.domain_column!r} (columns: {', '.join(names)})",
                           where=what, fix="regroup the corpus first (`rnb regroup`), assign domains with "
                           "`rnb assign`, or pass --domain-column with the column that holds the domains")
        if need_category and cfg.category_column not in names:
            raise RnbError(f"{f} has no category column {cfg.category_column!r}", where=what,
                           fix="pass --category-column with an existing column, or drop it")
        for rg, n in units:
            cols = [c for c in (cfg.domain_column if hive is None else None,
                                cfg.category_column if need_category else None) if c]
            t = read(cols, rg) if cols else None
            sources.append(Source(listed.path, rg, hive, fs))
            if hive is None:
                doms.append([_name(v) for v in t.column(cfg.domain_column).to_pylist()])
            else:
                doms.append([hive] * n)
            cats.append([_name(v) for v in t.column(cfg.category_column).to_pylist()] if need_category else [None] * n)
    return sources, doms, cats


# ---------------------------------------------------------------------------------------------- plan
def prepare_plan(cfg: TrainConfig) -> Plan:
    """Read the domain columns, validate, split, and plan the streams (driver side, before Ray work)."""
    warnings: list[str] = []
    need_cat = cfg.category_column is not None
    sources, doms, cats = _scan(cfg.data, cfg, "--data", need_cat)
    nulls = sum(d is None for rows in doms for d in rows)
    if nulls:
        warnings.append(f"{nulls} training rows have no domain value and are skipped")

    # Group rows by (domain, category), keeping (source key, row) addresses.
    groups: dict[tuple[str, str | None], list[tuple[int, int]]] = {}
    for key, (drows, crows) in enumerate(zip(doms, cats, strict=True)):
        for r, (d, c) in enumerate(zip(drows, crows, strict=True)):
            if d is not None:
                groups.setdefault((d, c), []).append((key, r))
    names = _order({d for d, _ in groups})

    train_addr: dict[str, list[tuple[int, int]]] = {d: [] for d in names}
    eval_addr: dict[str, list[tuple[int, int]]] = {d: [] for d in names}
    eval_sources: list[Source] = []
    if cfg.eval_data is None:
        # Held-out split per domain and per original category: the same share of every (domain, category).
        for gi, ((d, _c), addrs) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))):
            perm = np.random.default_rng([cfg.seed, 17, gi]).permutation(len(addrs))
            n_eval = int(np.floor(cfg.eval_fraction * len(addrs)))
            for i, j in enumerate(perm):
                (eval_addr if i < n_eval else train_addr)[d].append(addrs[j])
    else:
        for (d, _c), addrs in groups.items():
            train_addr[d].extend(addrs)
        eval_sources, edoms, _ = _scan(cfg.eval_data, cfg, "--eval-data", False)
        unknown: dict[str, int] = {}
        for key, drows in enumerate(edoms):
            for r, d in enumerate(drows):
                if d is None:
                    continue
                if d in eval_addr:
                    eval_addr[d].append((len(sources) + key, r))
                else:
                    unknown[d] = unknown.get(d, 0) + 1
        if unknown:
            warnings.append(f"evaluation rows in domains absent from training are ignored: {unknown}")
    all_sources = sources + eval_sources

    # Domains listed by a regroup output with no rows are dropped (they cannot be sampled).
    listed = _listed_domains(cfg.data)
    if listed is not None:
        empty = sorted(str(k) for k in listed if str(k) not in train_addr)
        if empty:
            warnings.append(f"domain(s) {', '.join(empty)} have no training examples and are dropped")
    for d in list(names):
        if not train_addr[d]:
            warnings.append(f"domain {d} has no training examples and is dropped")
            names.remove(d)
    if len(names) < 2:
        raise RnbError(f"the corpus has {len(names)} domain(s) with training examples; mixing needs at least 2",
                       where=cfg.data, fix="regroup into more domains (k >= 2) or check --domain-column")

    sizes = np.array([len(train_addr[d]) for d in names], dtype=np.int64)
    eval_sizes = np.array([len(eval_addr[d]) for d in names], dtype=np.int64)
    if cfg.eval_data is not None:
        if eval_sizes.sum() == 0:
            raise RnbError("the evaluation data shares no domain with the training data", where=cfg.eval_data,
                           fix="assign the evaluation set to the training domains with `rnb assign --domains "
                           "OUT/domains.json`")
        q, q_source = eval_sizes / eval_sizes.sum(), "eval_data"
    else:
        q, q_source = sizes / sizes.sum(), "training proportions"
    if not (eval_sizes > 0).any():
        raise RnbError("no evaluation examples (every domain is too small to hold any out)", where=cfg.data,
                       fix="raise --eval-fraction or pass --eval-data")
    if cfg.floor * len(names) >= 1.0:
        raise RnbError(f"floor {cfg.floor} is too large for {len(names)} domains", where="--floor",
                       fix=f"use floor < 1/m = {1 / len(names):.4g}")

    def grouped(addrs: list[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
        by_key: dict[int, list[int]] = {}
        for k, r in sorted(addrs):
            by_key.setdefault(k, []).append(r)
        return [(k, np.asarray(v, dtype=np.int64)) for k, v in by_key.items()]

    eval_capped = []
    for i, d in enumerate(names):
        addrs = sorted(eval_addr[d])
        keep = np.random.default_rng([cfg.seed, 29, i]).permutation(len(addrs))[: cfg.eval_max_per_domain]
        eval_capped.append(grouped([addrs[j] for j in sorted(keep)]))

    plan = Plan(domains=names, sizes=sizes, eval_sizes=eval_sizes, q=q, text_column=cfg.text_column,
                sources=all_sources, train=[grouped(train_addr[d]) for d in names], eval=eval_capped,
                q_source=q_source, warnings=warnings)
    if cfg.strategy == "static":
        plan.static_weights = load_static_weights(cfg.static_weights or "", names)
    return plan


def _listed_domains(data: str) -> dict | None:
    """``sizes`` of the domains.json of a regroup output at ``data`` ({} when unreadable), else None."""
    if storage.is_uri(data):
        fs, p = storage.resolve(data, "--data")
        try:
            if fs.get_file_info(f"{p}/domains.json").type != pafs.FileType.File:
                return None
            raw = storage.read_bytes(fs, f"{p}/domains.json").decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return {}
    else:
        meta = Path(data) / "domains.json"
        if not meta.is_file():
            return None
        raw = meta.read_text(encoding="utf-8")
    try:
        listed = json.loads(raw).get("sizes", {})
    except (json.JSONDecodeError, AttributeError):
        listed = {}
    return listed if isinstance(listed, dict) else {}


def load_static_weights(path: str, domains: list[str]) -> np.ndarray:
    """``{domain: weight}`` (or a mixture.json, whose "final" is used) → weights in domain order."""
    where = f"--static-weights {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RnbError(f"cannot read static weights: {e}", where=where, fix='give a JSON object {"domain": weight}') from e
    if isinstance(data, dict) and isinstance(data.get("final"), dict):
        data = data["final"]
    if not isinstance(data, dict):
        raise RnbError("static weights must be a JSON object {domain: weight}", where=where,
                       fix='e.g. {"0": 0.5, "1": 0.5}')
    data = {str(k): v for k, v in data.items()}
    missing, extra = sorted(set(domains) - set(data)), sorted(set(data) - set(domains))
    if missing or extra:
        raise RnbError(f"static weights name the wrong domains (missing: {missing or 'none'}; unknown: "
                       f"{extra or 'none'})", where=where, fix=f"give one weight for each of {domains}")
    try:
        return check_weights([data[d] for d in domains], len(domains))
    except (ValueError, TypeError) as e:
        raise RnbError(f"bad static weights: {e}", where=where,
                       fix="non-negative numbers, one per domain, summing to 1 (±1e-6)") from e


# ---------------------------------------------------------------------------------------------- workers
def _share(chunks: list[tuple[int, np.ndarray]], rank: int, world: int) -> list[Chunk]:
    """This worker's share of one domain: every world-th row across the domain (all rows if it is tiny)."""
    total = sum(len(rows) for _, rows in chunks)
    out, offset = [], 0
    for key, rows in chunks:
        idx = offset + np.arange(len(rows))
        offset += len(rows)
        mine = rows if total < world else rows[idx % world == rank]
        if len(mine):
            out.append(Chunk(key, mine))
    return out


def worker_streams(plan: Plan, rank: int, world: int, seed: int, reader: ChunkReader) -> list[DomainStream]:
    return [DomainStream(_share(chunks, rank, world), seed=seed * 7919 + rank * 131 + d, loader=reader)
            for d, chunks in enumerate(plan.train)]


def worker_eval_set(plan: Plan, rank: int, world: int, reader: ChunkReader) -> list[list[str]]:
    """This worker's evaluation texts per domain (the capped set split across workers, no overlap)."""
    out = []
    for chunks in plan.eval:
        texts: list[str] = []
        offset = 0
        for key, rows in chunks:
            mine = rows[(offset + np.arange(len(rows))) % world == rank]
            offset += len(rows)
            if len(mine):
                texts.extend(reader(key, mine))
        out.append(texts)
    return out


class ChunkReader:
    """Reads the text of given rows of one source (a parquet row group or a jsonl file)."""

    def __init__(self, sources: list[Source], text_column: str):
        self.sources = sources
        self.text_column = text_column
        self._files: dict[str, pq.ParquetFile] = {}
        self._jsonl: tuple[str, pa.Table] | None = None

    def __call__(self, key: int, rows: np.ndarray) -> list[str]:
        src = self.sources[key]
        if src.row_group is not None:
            pf = self._files.get(src.path)
            if pf is None:
                pf = self._files[src.path] = pq.ParquetFile(files.pyarrow_source(src.fs, src.path, random_access=True))
            col = pf.read_row_group(src.row_group, columns=[self.text_column]).column(0)
        else:
            if self._jsonl is None or self._jsonl[0] != src.path:
                raw = pajson.read_json(files.pyarrow_source(src.fs, src.path))
                self._jsonl = (src.path, raw.select([self.text_column]))
            col = self._jsonl[1].column(0)
        values = col.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()
        return ["" if v is None else str(v) for v in values]
