"""The training data plan of a Balance run: list the files and row groups, count every domain, plan the streams.

Accepted ``--data`` (a local path, or an ``s3://``/``gs://`` URI read through pyarrow's filesystems): an
``rnb regroup`` output directory (``domains.json`` + ``data/domain-<id>/*.parquet``), or any parquet/jsonl file
or directory of them with a domain column (``domain_column``) or ``<domain_column>=<v>`` directories; the files
are listed by :mod:`rnb_ray.files`. Domain names are the string form of the values, ordered numerically when
all are integers, else lexicographically.

``prepare_plan`` runs on the driver before any Ray work and never holds a per-document list: the ``Plan``
grows with the number of files and row groups (*units*), not with documents. Per unit it learns the domain
of every row from, in this order:

1. the parquet column statistics of the domain column (min == max and no nulls: the whole row group is one
   domain) — an ``rnb regroup`` output, or any corpus written sorted by domain, is planned from file footers
   alone;
2. a ``<domain_column>=<v>`` directory above the file, when the file has no domain column;
3. otherwise (mixed row groups, jsonl files) a scan of the domain column only, one row group at a time.

The held-out split is decided per document by a hash of a stable id (``balance/split.py``): the file's path
relative to the data root (the same locally and on an object store) and the row's number within the file. The
driver hashes row numbers (no IO) to count training and held-out documents per domain exactly; a worker applies
the same hash while it streams. ``domains.json`` is read only to name domains that have no rows.

Each worker builds its streams from the plan (``worker_streams``): a domain's units are shared out among the
workers by unit (balanced by rows), or — when the domain has fewer units than workers — every worker reads
every unit and keeps every world-th training row. A ``SourceReader`` reads one row group at a time, in batches.
The evaluation examples of a domain (at most ``eval_max_per_domain``) are the first held-out documents of a few
seeded-random units of that domain (``EVAL_UNITS``), so reading them costs a few row-group prefixes, whatever
the corpus size; they are split across workers without overlap.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rnb_ray import files, storage
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.sampler import DomainStream
from rnb_ray.balance.split import hash_uniform, is_heldout, source_key
from rnb_ray.balance.strategies.simple import check_weights
from rnb_ray.errors import RnbError

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".jsonl", ".json")  # what --data may hold
EVAL_UNITS = 8  # a domain's evaluation examples come from this many of its units (more if they hold too few)
OPEN_FILES = 64  # parquet files a worker keeps open (streams reading a file keep it open themselves)
READ_BATCH = 1024  # rows decoded at a time when streaming a row group


@dataclass(frozen=True)
class Source:
    """One readable unit: a parquet row group or a whole jsonl file."""

    path: str  # local path, or the path inside ``fs``
    name: str  # path relative to the data root: the split's source name
    row_group: int | None  # None: jsonl
    first_row: int  # number (within the file) of the unit's first row
    num_rows: int
    hive_domain: str | None = None  # value from a `<domain_column>=<v>` directory when the file lacks the column
    fs: Any = field(default=None, compare=False, repr=False)  # pyarrow filesystem of a URI; None: local

    @property
    def display(self) -> str:
        return storage.display_path(self.fs, self.path)

    @property
    def split_key(self) -> int:
        return source_key(self.name)


@dataclass(frozen=True)
class TrainUnit:
    """A unit's part in one domain's training stream."""

    key: int  # index into Plan.sources
    rows: int  # training rows of this domain in the unit
    mixed: bool  # the unit holds other domains too: rows are filtered by the domain column


@dataclass
class Plan:
    """Everything workers need to build their streams; plain data whose size grows with units, not documents
    (it pickles into the train loop config)."""

    domains: list[str]
    sizes: np.ndarray  # training examples per domain
    eval_sizes: np.ndarray  # evaluation examples per domain (before the per-domain cap)
    q: np.ndarray  # evaluation proportions
    text_column: str
    domain_column: str
    sources: list[Source]
    train: list[list[TrainUnit]]  # per domain
    eval: list[list[tuple[int, np.ndarray]]]  # per domain: (source key, rows within the unit), capped
    q_source: str  # "eval_data" | "training proportions"
    heldout: float  # share of --data held out (0 with --eval-data)
    seed: int  # the split's seed
    warnings: list[str] = field(default_factory=list)
    static_weights: np.ndarray | None = None
    domain_counts_from: dict[str, int] = field(default_factory=dict)  # units per way the domains were learned

    @property
    def m(self) -> int:
        return len(self.domains)


# ---------------------------------------------------------------------------------------------- files
def list_data(path: str, what: str = "--data") -> tuple[pafs.FileSystem | None, list[files.ListedFile], str]:
    """The parquet/jsonl files of ``--data``/``--eval-data`` (a local path or a URI): one file, or those under a
    directory — the ``data/`` of an ``rnb regroup`` output (recognised by its ``domains.json``) —, the filesystem
    they are in (None: local) and the root their split names are relative to."""
    loc = files.locate(path, what)
    if loc.kind == "file":
        if Path(loc.path).suffix not in SUFFIXES:
            raise RnbError(f"{loc.shown} is not a parquet or jsonl file", where=what,
                           fix="give .parquet or .jsonl data")
        return loc.fs, files.list_files(loc), str(Path(loc.path).parent) if loc.fs is None else loc.path.rsplit("/", 1)[0]
    if loc.kind == "missing":
        raise RnbError(f"{loc.shown} does not exist", where=what,
                       fix="check the path" if loc.fs is None else "check the URI")
    root = loc.path
    if loc.child("domains.json").kind == "file" and (data := loc.child("data")).kind == "dir":
        loc = data
    found = files.list_files(loc, suffixes=SUFFIXES)
    if not found:
        raise RnbError(f"no parquet or jsonl files under {loc.shown}", where=what,
                       fix="point --data at an `rnb regroup` output or at parquet/jsonl files")
    return loc.fs, found, root


def _relative(root: str, path: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def domain_name(value: object) -> str | None:
    """A domain value's name: integers without a decimal point, None for nulls."""
    if value is None:
        return None
    if isinstance(value, float):
        if np.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def order_domains(names: set[str]) -> list[str]:
    """Numerically when every name is an integer, else lexicographically."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def domain_codes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """(each row's code, -1 for nulls; the distinct domain names), converting only the distinct values."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    enc = pc.dictionary_encode(column)
    names: list[str] = []
    remap = []
    for v in enc.dictionary.to_pylist():
        name = domain_name(v)
        if name is None:
            remap.append(-1)
            continue
        if name not in names:
            names.append(name)
        remap.append(names.index(name))
    lut = np.asarray(remap + [-1], dtype=np.int64)
    return lut[enc.indices.fill_null(len(remap)).to_numpy(zero_copy_only=False)], names


def domain_names(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each row's domain name (None for nulls) as an object array."""
    codes, names = domain_codes(column)
    return np.asarray(names + [None], dtype=object)[codes]


def _heldout(src: Source, rows: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Which rows (numbers within the unit) are held out: the split of ``balance/split.py`` (1.0: all)."""
    if fraction >= 1.0:
        return np.ones(len(rows), dtype=bool)
    return is_heldout(src.split_key, src.first_row + np.asarray(rows, dtype=np.int64), seed, fraction)


@dataclass
class _Side:
    """What the driver learns of one corpus (``--data`` or ``--eval-data``), unit by unit."""

    sources: list[Source] = field(default_factory=list)
    train: dict[str, list[TrainUnit]] = field(default_factory=dict)
    n_eval: dict[str, int] = field(default_factory=dict)
    # per domain: the EVAL_UNITS candidate units with the lowest priority (priority, key, held-out rows)
    eval_pick: dict[str, list[tuple[float, int, np.ndarray]]] = field(default_factory=dict)
    nulls: int = 0
    how: dict[str, int] = field(default_factory=dict)


def _scan(path: str, cfg: TrainConfig, what: str, fraction: float, key0: int, cap: int) -> _Side:
    """Units of a corpus with, per domain, training rows, held-out counts and evaluation candidates."""
    fs, found, root = list_data(path, what)
    side = _Side()
    need_category = cfg.category_column is not None and what == "--data"
    for listed in found:
        f, name = listed.shown, _relative(root, listed.path)
        parquet = Path(listed.path).suffix == ".parquet"
        if parquet:
            try:
                pf = pq.ParquetFile(files.pyarrow_source(fs, listed.path, random_access=True))
            except (pa.ArrowInvalid, OSError) as e:
                raise RnbError(f"cannot read parquet file {f}: {e}", where=what,
                               fix="rewrite or remove the file (it is truncated or not parquet)") from e
            names = pf.schema_arrow.names
            table = None
        else:
            try:
                table = pajson.read_json(files.pyarrow_source(fs, listed.path))
            except (pa.ArrowInvalid, OSError) as e:
                raise RnbError(f"cannot read {f} as JSON lines: {e}", where=what,
                               fix="one JSON object per line") from e
            names, pf = table.column_names, None
        if cfg.text_column not in names:
            raise RnbError(f"{f} has no text column {cfg.text_column!r} (columns: {', '.join(names)})",
                           where=what, fix="pass --text-column with the right name")
        hive = None if cfg.domain_column in names else files.hive_value(listed, cfg.domain_column)
        if cfg.domain_column not in names and hive is None:
            raise RnbError(f"{f} has no domain column {cfg.domain_column!r} (columns: {', '.join(names)})",
                           where=what, fix="regroup the corpus first (`rnb regroup`), assign domains with "
                           "`rnb assign`, or pass --domain-column with the column that holds the domains (every "
                           "file needs it)")
        if need_category and cfg.category_column not in names:
            raise RnbError(f"{f} has no category column {cfg.category_column!r}", where=what,
                           fix="pass --category-column with an existing column, or drop it")
        units: list[tuple[int | None, int]] = (
            [(rg, pf.metadata.row_group(rg).num_rows) for rg in range(pf.num_row_groups)] if pf is not None
            else [(None, table.num_rows)])
        col = None if pf is None else next((i for i in range(pf.metadata.num_columns)
                                            if pf.metadata.schema.column(i).path == cfg.domain_column), None)
        first = 0
        for rg, n in units:
            src = Source(listed.path, name, rg, first, n, hive, fs)
            first += n
            key = key0 + len(side.sources)
            side.sources.append(src)
            if n == 0:
                continue
            uniform = hive
            how = "hive directory"
            prio = float(hash_uniform(np.array([src.split_key + (rg or 0)]), cfg.seed + 101)[0])
            if uniform is None and pf is not None and col is not None:
                st = pf.metadata.row_group(rg).column(col).statistics
                if st is not None and st.has_min_max and st.null_count == 0 and st.min == st.max:
                    uniform, how = domain_name(st.min), "parquet statistics"
            if uniform is not None:
                held = _heldout(src, np.arange(n), cfg.seed, fraction)
                _add(side, uniform, key, src, np.arange(n), held, mixed=False, cap=cap, prio=prio)
            else:
                how = "domain column scan"
                try:
                    column = (pf.read_row_group(rg, columns=[cfg.domain_column]).column(0) if pf is not None
                              else table.column(cfg.domain_column))
                except (pa.ArrowInvalid, OSError) as e:
                    raise RnbError(f"cannot read the domain column of {f}: {e}", where=what,
                                   fix="rewrite or remove the file (it is corrupt)") from e
                codes, values = domain_codes(column)
                held = _heldout(src, np.arange(n), cfg.seed, fraction)
                nulls = int((codes < 0).sum())
                side.nulls += nulls
                if len(values) < 2**15:
                    codes = codes.astype(np.int16)  # a stable sort of 16-bit keys is a radix sort
                order = np.argsort(codes, kind="stable")  # rows grouped by domain, in row order within each
                bounds = np.searchsorted(codes[order], np.arange(-1, len(values) + 1))
                for c, d in enumerate(values):
                    rows = order[bounds[c + 1]:bounds[c + 2]]
                    if len(rows):
                        _add(side, d, key, src, rows, held[rows], mixed=len(values) > 1 or nulls > 0,
                             cap=cap, prio=prio)
            side.how[how] = side.how.get(how, 0) + 1
    return side


def _add(side: _Side, d: str, key: int, src: Source, rows: np.ndarray, held: np.ndarray, *, mixed: bool,
         cap: int, prio: float) -> None:
    """Count one unit's rows of domain ``d``; keep it as an evaluation candidate if it ranks among the
    ``EVAL_UNITS`` with the lowest priority (a seeded hash of the unit)."""
    n_held = int(held.sum())
    n_train = len(rows) - n_held
    side.n_eval[d] = side.n_eval.get(d, 0) + n_held
    units = side.train.setdefault(d, [])
    if n_train:
        units.append(TrainUnit(key, n_train, mixed))
    if not n_held:
        return
    picks = side.eval_pick.setdefault(d, [])
    if len(picks) >= EVAL_UNITS and prio >= picks[-1][0] and sum(len(r) for _, _, r in picks) >= cap:
        return  # ranks after units that already hold enough
    picks.append((prio, key, rows[held][:cap]))  # the first held-out rows of the unit
    picks.sort(key=lambda t: (t[0], t[1]))
    total = 0  # keep EVAL_UNITS units, more only while they hold fewer than `cap` rows together
    for i, (_, _, r) in enumerate(picks):
        if i >= EVAL_UNITS and total >= cap:
            del picks[i:]
            break
        total += len(r)


def _eval_rows(picks: list[tuple[float, int, np.ndarray]], cap: int) -> list[tuple[int, np.ndarray]]:
    """At most ``cap`` evaluation rows, taken round-robin from the picked units (in priority order)."""
    take = [0] * len(picks)
    left = cap
    while left > 0:
        progressed = False
        for i, (_, _, rows) in enumerate(picks):
            if left and take[i] < len(rows):
                take[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return [(key, rows[:t]) for (_, key, rows), t in sorted(zip(picks, take, strict=True), key=lambda x: x[0][1])
            if t]


# ---------------------------------------------------------------------------------------------- plan
def prepare_plan(cfg: TrainConfig) -> Plan:
    """List units, count domains, validate, and plan the streams (driver side, before Ray work)."""
    warnings: list[str] = []
    cap = cfg.eval_max_per_domain
    heldout = 0.0 if cfg.eval_data is not None else cfg.eval_fraction
    data = _scan(cfg.data, cfg, "--data", heldout, 0, cap)
    if data.nulls:
        warnings.append(f"{data.nulls} training rows have no domain value and are skipped")
    sources = list(data.sources)
    names = order_domains(set(data.train))
    n_eval, eval_pick = data.n_eval, data.eval_pick
    how = dict(data.how)
    if cfg.eval_data is not None:
        ev = _scan(cfg.eval_data, cfg, "--eval-data", 1.0, len(sources), cap)
        sources += ev.sources
        for k, v in ev.how.items():
            how[f"eval: {k}"] = v
        unknown = {d: c for d, c in ev.n_eval.items() if d not in data.train}
        if unknown:
            warnings.append(f"evaluation rows in domains absent from training are ignored: {unknown}")
        n_eval = {d: ev.n_eval.get(d, 0) for d in names}
        eval_pick = {d: ev.eval_pick.get(d, []) for d in names}

    # Domains listed by a regroup output with no rows are dropped (they cannot be sampled).
    listed = _listed_domains(cfg.data)
    if listed is not None:
        empty = sorted(str(k) for k in listed if str(k) not in data.train)
        if empty:
            warnings.append(f"domain(s) {', '.join(empty)} have no training examples and are dropped")
    for d in list(names):
        if not data.train[d]:
            warnings.append(f"domain {d} has no training examples and is dropped")
            names.remove(d)
    if len(names) < 2:
        raise RnbError(f"the corpus has {len(names)} domain(s) with training examples; mixing needs at least 2",
                       where=cfg.data, fix="regroup into more domains (k >= 2) or check --domain-column")

    sizes = np.array([sum(u.rows for u in data.train[d]) for d in names], dtype=np.int64)
    eval_sizes = np.array([n_eval.get(d, 0) for d in names], dtype=np.int64)
    q, q_source = mixture_target(cfg, sizes, eval_sizes, unit="examples")
    if cfg.floor * len(names) >= 1.0:
        raise RnbError(f"floor {cfg.floor} is too large for {len(names)} domains", where="--floor",
                       fix=f"use floor < 1/m = {1 / len(names):.4g}")

    plan = Plan(domains=names, sizes=sizes, eval_sizes=eval_sizes, q=q, text_column=cfg.text_column,
                domain_column=cfg.domain_column, sources=sources, train=[data.train[d] for d in names],
                eval=[_eval_rows(eval_pick.get(d, []), cap) for d in names], q_source=q_source,
                heldout=heldout, seed=cfg.seed, warnings=warnings, domain_counts_from=how)
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


def mixture_target(cfg: TrainConfig, sizes: np.ndarray, eval_sizes: np.ndarray, *, unit: str
                   ) -> tuple[np.ndarray, str]:
    """(q, where it came from): the evaluation data's share per domain with ``--eval-data``, else the training
    proportions; refused when nothing can be evaluated (``unit`` names what is counted in the message)."""
    if cfg.eval_data is not None:
        if eval_sizes.sum() == 0:
            raise RnbError("the evaluation data shares no domain with the training data", where=cfg.eval_data,
                           fix="assign the evaluation set to the training domains with `rnb assign --domains "
                           "OUT/domains.json`")
        q, q_source = eval_sizes / eval_sizes.sum(), "eval_data"
    else:
        q, q_source = sizes / sizes.sum(), "training proportions"
    if not (eval_sizes > 0).any():
        raise RnbError(f"no evaluation {unit} (every domain is too small to hold any out)", where=cfg.data,
                       fix="raise --eval-fraction or pass --eval-data")
    return q, q_source


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
@dataclass(frozen=True)
class StreamUnit:
    """One unit of a worker's stream for a domain (what ``SourceReader.train_rows`` needs)."""

    key: int
    mixed: bool
    offset: int = 0  # with striding: the domain's training rows before this unit
    stride: tuple[int, int] | None = None  # (rank, world): keep the training rows with (offset + k) % world == rank


def share(units: list[TrainUnit], rank: int, world: int) -> list[StreamUnit]:
    """This worker's share of one domain: whole units when there are at least as many as workers (balanced by
    rows, deterministically), else every world-th training row of every unit (all rows if the domain has fewer
    training rows than workers)."""
    if len(units) >= world:
        load = [0] * world
        owner = {}
        for i in sorted(range(len(units)), key=lambda i: (-units[i].rows, i)):
            r = min(range(world), key=lambda w: (load[w], w))
            owner[i] = r
            load[r] += units[i].rows
        return [StreamUnit(u.key, u.mixed) for i, u in enumerate(units) if owner[i] == rank]
    total = sum(u.rows for u in units)
    if total < world:
        return [StreamUnit(u.key, u.mixed) for u in units]
    offsets = np.concatenate([[0], np.cumsum([u.rows for u in units])[:-1]])
    return [StreamUnit(u.key, u.mixed, int(o), (rank, world)) for u, o in zip(units, offsets, strict=True)]


def worker_streams(plan: Plan, rank: int, world: int, seed: int, reader: SourceReader,
                   buffer: int = 2048) -> list[DomainStream]:
    return [DomainStream(share(units, rank, world), seed=seed * 7919 + rank * 131 + d,
                         loader=partial(reader.train_rows, domain=plan.domains[d]), buffer=buffer)
            for d, units in enumerate(plan.train)]


def worker_eval_set(plan: Plan, rank: int, world: int, reader: SourceReader) -> list[list[str]]:
    """This worker's evaluation texts per domain (the capped set split across workers, no overlap)."""
    out = []
    for chunks in plan.eval:
        texts: list[str] = []
        offset = 0
        for key, rows in chunks:
            mine = rows[(offset + np.arange(len(rows))) % world == rank]
            offset += len(rows)
            if len(mine):
                texts.extend(reader.rows(key, mine))
        out.append(texts)
    return out


class SourceReader:
    """Reads text from the plan's units, one row group at a time, in batches of ``READ_BATCH`` rows."""

    def __init__(self, plan: Plan, batch_rows: int = READ_BATCH):
        self.plan = plan
        self.batch_rows = batch_rows
        self._files: OrderedDict[str, pq.ParquetFile] = OrderedDict()
        self._jsonl: tuple[str, pa.Table] | None = None

    def _batches(self, src: Source, columns: list[str], batch_rows: int | None = None
                 ) -> Iterator[tuple[int, pa.Table | pa.RecordBatch]]:
        """(first row within the unit, batch) over the whole unit."""
        try:
            if src.row_group is not None:
                pf = self._files.get(src.path)
                if pf is not None:
                    self._files.move_to_end(src.path)
                else:
                    if len(self._files) >= OPEN_FILES:
                        self._files.popitem(last=False)
                    # buffered: a stream holds ~1 MiB of a column chunk, not the whole row group's text
                    pf = self._files[src.path] = pq.ParquetFile(
                        files.pyarrow_source(src.fs, src.path, random_access=True), buffer_size=1 << 20)
                start = 0
                for batch in pf.iter_batches(batch_size=batch_rows or self.batch_rows, row_groups=[src.row_group],
                                             columns=columns):
                    yield start, batch
                    start += batch.num_rows
            else:
                if self._jsonl is None or self._jsonl[0] != src.path:
                    self._jsonl = (src.path, pajson.read_json(files.pyarrow_source(src.fs, src.path)))
                yield 0, self._jsonl[1].select(columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise RnbError(f"cannot read {src.display}: {e}", where="--data",
                           fix="rewrite or remove the file (it is corrupt or truncated)") from e

    @staticmethod
    def _texts(col: pa.Array | pa.ChunkedArray, idx: np.ndarray) -> list[str]:
        return ["" if v is None else str(v) for v in col.take(pa.array(idx, type=pa.int64())).to_pylist()]

    def train_rows(self, unit: Hashable, start: int, *, domain: str) -> Iterator[tuple[Sequence[int], list[str]]]:
        """The training rows of ``domain`` in ``unit`` (a ``StreamUnit``) that this worker owns, from row
        ``start`` of the unit on: (row numbers within the unit, texts)."""
        assert isinstance(unit, StreamUnit)
        plan, src = self.plan, self.plan.sources[unit.key]
        cols = [plan.text_column] + ([plan.domain_column] if unit.mixed else [])
        seen = 0  # training rows of this domain before the current batch (for striding)
        for first, batch in self._batches(src, cols):
            n = batch.num_rows
            if first + n <= start and unit.stride is None:
                continue
            rows = np.arange(first, first + n)
            keep = ~_heldout(src, rows, plan.seed, plan.heldout) if plan.heldout > 0 else np.ones(n, dtype=bool)
            if unit.mixed:
                keep &= domain_names(batch.column(1)) == domain
            if unit.stride is not None:
                rank, world = unit.stride
                k = unit.offset + seen + np.cumsum(keep) - 1
                seen += int(keep.sum())
                keep &= (k % world) == rank
            keep &= rows >= start
            idx = np.flatnonzero(keep)
            if len(idx):
                yield (rows[idx]).tolist(), self._texts(batch.column(0), idx)

    def rows(self, key: int, rows: np.ndarray) -> list[str]:
        """The texts of given rows of a unit, in that order (reads the unit up to the last of them)."""
        rows = np.asarray(rows, dtype=np.int64)
        want = {int(r): i for i, r in enumerate(rows)}
        out: list[str] = [""] * len(rows)
        last = int(rows.max()) if len(rows) else -1
        size = min(self.batch_rows, last + 1) if last >= 0 else self.batch_rows  # decode only the prefix needed
        for first, batch in self._batches(self.plan.sources[key], [self.plan.text_column], size):
            if first > last:
                break
            sel = [r for r in range(first, first + batch.num_rows) if r in want]
            if sel:
                for r, t in zip(sel, self._texts(batch.column(0), np.asarray(sel) - first), strict=True):
                    out[want[r]] = t
        return out


def plan_bytes(plan: Plan) -> int:
    """The plan's pickled size (what every worker receives)."""
    import pickle

    return len(pickle.dumps(plan))

