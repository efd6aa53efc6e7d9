"""``rnb tokenize``: a regrouped corpus → per-domain token shards, once, as a Ray Data job.

The driver lists the input (``balance.plan.list_data``: an ``rnb regroup`` output or parquet/jsonl files) and
checks every file's schema (text column; domain column or a ``domain=<id>`` directory) before any Ray work.
Each *unit* — a parquet row group, or a jsonl file — becomes one row of a Dataset; ``map_batches`` hands
units to a pool of tokenizer actors (``ActorPoolStrategy(size=workers)``, the tokenizer loaded once per
actor in ``__init__``). An actor reads its unit, drops empty texts and rows without a domain, encodes every
document with EOS appended (``tokens/encode.py``) and writes one shard per domain present in the unit,
``domain=<id>/part-<unit>.{bin,idx}``, straight into the output's temporary directory; it returns only the
counts. The driver collects those rows into ``tokens.json`` (written last) and the directory is renamed
into place: a failed job leaves nothing. Shard names and contents depend on the input alone, not on the
number of actors or the order they finish in.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rnb_ray import atomic, files
from rnb_ray.balance.plan import domain_name, order_domains  # shards name domains as training does
from rnb_ray.errors import RnbError
from rnb_ray.tokens.config import TokenizeConfig
from rnb_ray.tokens.indexed import token_dtype, write_shard
from rnb_ray.tokens.shards import FORMAT, MANIFEST

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    index: int
    path: str
    row_group: int | None  # None: a jsonl file
    hive_domain: str | None  # the domain from a `<domain_column>=<v>` directory when the file has no column




def plan_units(cfg: TokenizeConfig) -> tuple[Any, list[Unit], Path | None]:
    """(filesystem, units, the source's domains.json or None), every file's columns checked."""
    from rnb_ray.balance.plan import list_data

    fs, found, _root = list_data(cfg.data, "--data")
    units: list[Unit] = []
    for listed in found:
        f = listed.shown
        if listed.path.endswith(".parquet"):
            try:
                pf = pq.ParquetFile(files.pyarrow_source(fs, listed.path, random_access=True))
            except (pa.ArrowInvalid, OSError) as e:
                raise RnbError(f"cannot read parquet file {f}: {e}", where="--data") from e
            names, groups = pf.schema_arrow.names, list(range(pf.num_row_groups))
        else:
            try:
                names, groups = pajson.read_json(files.pyarrow_source(fs, listed.path)).column_names, [None]
            except (pa.ArrowInvalid, OSError) as e:
                raise RnbError(f"cannot read {f} as JSON lines: {e}", where="--data") from e
        if cfg.text_column not in names:
            raise RnbError(f"{f} has no text column {cfg.text_column!r} (columns: {', '.join(names)})",
                           where="--data", fix="pass --text-column with the right name")
        hive = None if cfg.domain_column in names else files.hive_value(listed, cfg.domain_column)
        if cfg.domain_column not in names and hive is None:
            raise RnbError(f"{f} has no domain column {cfg.domain_column!r} (columns: {', '.join(names)})",
                           where="--data", fix="tokenize a regrouped corpus (`rnb regroup`/`rnb assign` output) "
                           "or pass --domain-column with the column that holds the domains")
        for rg in groups:
            units.append(Unit(len(units), listed.path, rg, hive))
    domains_json = None
    if fs is None and Path(cfg.data).is_dir() and (Path(cfg.data) / "domains.json").is_file():
        domains_json = Path(cfg.data) / "domains.json"
    return fs, units, domains_json


ROW_KEYS = ("unit", "domain", "path", "documents", "tokens", "dropped_empty", "dropped_no_domain", "seconds",
            "cpu_seconds")


class TokenizeActor:
    """A Ray Data actor: tokenises whole units and writes their shards (callable class for ``map_batches``)."""

    def __init__(self, tokenizer: str, fs: Any, out: str, text_column: str, domain_column: str, dtype: str,
                 end: int):
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per actor: scale with actors
        from rnb_ray.balance.lm import load_tokenizer

        self.tok = load_tokenizer(None, tokenizer)
        self.fs, self.out, self.end = fs, Path(out), end
        self.text_column, self.domain_column, self.dtype = text_column, domain_column, np.dtype(dtype)

    def _read(self, unit: Unit) -> tuple[list[Any], list[str | None]]:
        cols = [self.text_column] + ([self.domain_column] if unit.hive_domain is None else [])
        if unit.row_group is not None:
            pf = pq.ParquetFile(files.pyarrow_source(self.fs, unit.path, random_access=True))
            t = pf.read_row_group(unit.row_group, columns=cols)
        else:
            t = pajson.read_json(files.pyarrow_source(self.fs, unit.path)).select(cols)
        texts = t.column(self.text_column).to_pylist()
        doms = ([domain_name(v) for v in t.column(self.domain_column).to_pylist()] if unit.hive_domain is None
                else [unit.hive_domain] * len(texts))
        return texts, doms

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows: list[dict[str, Any]] = []
        for i in range(len(batch["index"])):
            rg, hive = int(batch["row_group"][i]), batch["hive_domain"][i]
            unit = Unit(int(batch["index"][i]), str(batch["path"][i]), None if rg < 0 else rg,
                        None if hive is None or hive == "" else str(hive))
            rows.extend(self.tokenize_unit(unit))
        return {k: [r[k] for r in rows] for k in ROW_KEYS}

    def tokenize_unit(self, unit: Unit) -> list[dict[str, Any]]:
        """Write the unit's shards (one per domain in it); one row per shard (or one empty row), the unit's
        drop counts and seconds on the first."""
        from rnb_ray.tokens.encode import encode_documents

        t0, c0 = time.perf_counter(), time.process_time()
        texts, doms = self._read(unit)
        empty = no_domain = 0
        by: dict[str, list[str]] = {}
        for t, d in zip(texts, doms, strict=True):
            if t is None or not str(t).strip():
                empty += 1
            elif d is None:
                no_domain += 1
            else:
                by.setdefault(d, []).append(str(t))
        rows = []
        for d, ts in by.items():
            rel = f"domain={d}/part-{unit.index:05d}"
            (self.out / f"domain={d}").mkdir(parents=True, exist_ok=True)
            n_docs, n_tok = write_shard(self.out / rel, encode_documents(self.tok, ts, self.end), self.dtype)
            rows.append({"unit": unit.index, "domain": d, "path": rel, "documents": n_docs, "tokens": n_tok})
        if not rows:
            rows.append({"unit": unit.index, "domain": "", "path": "", "documents": 0, "tokens": 0})
        for j, r in enumerate(rows):
            r.update(dropped_empty=empty if j == 0 else 0, dropped_no_domain=no_domain if j == 0 else 0,
                     seconds=time.perf_counter() - t0 if j == 0 else 0.0,
                     cpu_seconds=time.process_time() - c0 if j == 0 else 0.0)
        return rows


def tokenize_corpus(cfg: TokenizeConfig) -> dict[str, Any]:
    """Run the job (Ray must be connected); returns the manifest written to ``TOK_OUT/tokens.json``."""
    import ray

    from rnb_ray import ray_env
    from rnb_ray.balance.lm import load_tokenizer, tokenizer_source
    from rnb_ray.outputs import atomic_output_dir, check_output_dir
    from rnb_ray.tokens.encode import tokenizer_info

    cfg.validate()
    t0 = time.perf_counter()
    check_output_dir(cfg.output, cfg.overwrite)
    fs, units, domains_json = plan_units(cfg)
    source = tokenizer_source(cfg.model, cfg.tokenizer)
    tok = load_tokenizer(cfg.model, cfg.tokenizer)  # a bad tokenizer fails here, before Ray work
    info = tokenizer_info(tok, source)
    dtype = token_dtype(info["vocab_size"])
    ray_env.require_resources(cpus=cfg.workers, what=f"tokenizing with {cfg.workers} actors")
    out_path = Path(cfg.output).expanduser().absolute()
    with atomic_output_dir(out_path, cfg.overwrite) as tmp:
        items = [{"index": u.index, "path": u.path, "row_group": -1 if u.row_group is None else u.row_group,
                  "hive_domain": u.hive_domain or ""} for u in units]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(TokenizeActor, batch_size=1, num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                            fn_constructor_kwargs=dict(tokenizer=source, fs=fs, out=str(tmp),
                                                       text_column=cfg.text_column,
                                                       domain_column=cfg.domain_column, dtype=dtype.name,
                                                       end=info["eos_id"]))
        with ray_env.rnb_errors_from_ray():
            rows = ds.take_all()
        manifest = _manifest(cfg, rows, info, dtype, source_files=len(units))
        if domains_json is not None:
            shutil.copyfile(domains_json, tmp / "domains.json")
            manifest["domains_json"] = "domains.json"
        if not manifest["domains"]:
            raise RnbError(f"no documents to tokenize in {cfg.data} (every text is empty or has no domain)",
                           where="--data", fix="check --text-column and --domain-column")
        manifest["workers"], manifest["seconds"] = cfg.workers, time.perf_counter() - t0
        atomic.write_json(tmp / MANIFEST, manifest)
    return manifest


def _manifest(cfg: TokenizeConfig, rows: list[dict[str, Any]], info: dict[str, Any], dtype: np.dtype,
              source_files: int) -> dict[str, Any]:
    shards = sorted((r for r in rows if r["path"]), key=lambda r: (r["domain"], r["unit"]))
    names = order_domains({r["domain"] for r in shards})
    by: dict[str, dict[str, Any]] = {d: {"documents": 0, "tokens": 0, "shards": []} for d in names}
    for r in sorted(shards, key=lambda r: r["unit"]):
        b = by[r["domain"]]
        b["documents"] += int(r["documents"])
        b["tokens"] += int(r["tokens"])
        b["shards"].append(r["path"])
    return {
        "format": FORMAT, "format_version": 1, "dtype": dtype.name, "eos": "appended", "tokenizer": info,
        "domains": names, "by_domain": by,
        "shards": [{"path": r["path"], "domain": r["domain"], "documents": int(r["documents"]),
                    "tokens": int(r["tokens"])} for r in sorted(shards, key=lambda r: r["unit"])],
        "n_documents": sum(b["documents"] for b in by.values()), "n_tokens": sum(b["tokens"] for b in by.values()),
        "n_dropped_empty": sum(int(r["dropped_empty"]) for r in rows),
        "n_dropped_no_domain": sum(int(r["dropped_no_domain"]) for r in rows),
        "seconds_in_actors": sum(float(r["seconds"]) for r in rows),  # reading, tokenizing, writing
        "cpu_seconds_in_actors": sum(float(r["cpu_seconds"]) for r in rows),
        "source": str(Path(cfg.data).absolute()) if "://" not in cfg.data else cfg.data,
        "source_units": source_files, "text_column": cfg.text_column, "domain_column": cfg.domain_column,
        "domains_json": None,
    }
