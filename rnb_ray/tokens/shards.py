"""A token-shard directory (``rnb tokenize --output TOK_OUT``): its manifest ``tokens.json`` and its shards,
opened and checked for training (numpy and files only; no Ray, no torch).

```
TOK_OUT/
  tokens.json                       the manifest (below); written last
  domains.json                      the source's, copied when it had one (regroup output)
  domain=<id>/part-<unit>.bin|.idx  Megatron indexed datasets (rnb_ray/tokens/indexed.py), one document
                                    per sequence, EOS appended; <unit> = the input row group's number
```
``tokens.json``: ``{"format": "megatron-indexed", "format_version": 1, "dtype", "eos": "appended",
"tokenizer": {"name", "class", "vocab_size", "eos_id", "vocab_sha256"}, "domains": [names], "by_domain":
{name: {"documents", "tokens", "shards"}}, "shards": [{"path", "domain", "documents", "tokens"}],
"n_documents", "n_tokens", "n_dropped_empty", "n_dropped_no_domain", "seconds_in_actors",
"cpu_seconds_in_actors", "source", "source_units", "text_column", "domain_column", "domains_json", "workers",
"seconds"}`` (shard paths relative to TOK_OUT, without suffix; ARCHITECTURE.md has the full contract).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnb_ray.errors import RnbError
from rnb_ray.tokens.indexed import Shard, ShardError, check_shard, open_shard

MANIFEST = "tokens.json"
FORMAT = "megatron-indexed"


def is_token_dir(path: str | Path) -> bool:
    """Whether ``path`` holds token shards: a ``tokens.json``, or ``.idx`` files (then the manifest is missing,
    which ``open_token_dir`` reports)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / MANIFEST).is_file() or any(p.glob("*.idx")) or any(p.glob("domain=*/*.idx"))


@dataclass
class TokenDir:
    """An opened TOK_OUT: the manifest and, per domain (in manifest order), its shards' relative paths."""

    root: Path
    manifest: dict[str, Any]
    domains: list[str]
    shards: list[list[str]]  # per domain: relative shard prefixes
    counts: dict[str, int] = field(default_factory=dict)  # documents per shard (checked shards only)

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.manifest["tokenizer"]

    def shard(self, rel: str) -> Shard:
        """Shard ``rel`` opened (memory-mapped; the caller keeps it open as long as it needs)."""
        return open_checked(self.root, rel)


def _corrupt(root: Path, rel: str, e: Exception) -> RnbError:
    return RnbError(f"token shard {root / rel}.idx/.bin is corrupt: {e}", where=str(root / rel) + ".bin",
                    fix="re-run `rnb tokenize` into a new --output")


def open_checked(root: Path, rel: str) -> Shard:
    """Open shard ``rel`` of ``root``; a corrupt or truncated one is an RnbError naming its file."""
    try:
        return open_shard(root / rel)
    except (ShardError, OSError) as e:
        raise _corrupt(root, rel, e) from e


def check_checked(root: Path, rel: str) -> tuple[int, int]:
    """(documents, tokens) of shard ``rel``, checked without keeping it open; RnbError naming a corrupt one."""
    try:
        return check_shard(root / rel)
    except (ShardError, OSError) as e:
        raise _corrupt(root, rel, e) from e


def open_token_dir(path: str | Path, what: str = "--data", *, check_shards: bool = True) -> TokenDir:
    """Read the manifest and (``check_shards``) open every shard, checking it against its index and the
    manifest; every problem is an RnbError naming the file."""
    root = Path(path).absolute()
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise RnbError(f"{root} holds token shards (.idx files) but no {MANIFEST}", where=str(mpath),
                       fix="the tokenize job did not finish: re-run `rnb tokenize --output` into a new directory")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        domains = [str(d) for d in manifest["domains"]]
        by = manifest["by_domain"]
        shards = [list(by[d]["shards"]) for d in domains]
        _ = manifest["tokenizer"]["vocab_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise RnbError(f"{mpath} is not a valid token manifest: {e}", where=what,
                       fix="re-run `rnb tokenize`") from e
    td = TokenDir(root, manifest, domains, shards)
    for d, rels in zip(domains, shards, strict=True):
        n_docs = int(by[d].get("documents", 0))
        if check_shards:
            found = 0
            for rel in rels:
                td.counts[rel] = check_checked(root, rel)[0]
                found += td.counts[rel]
            if found != n_docs:
                raise RnbError(f"domain {d} has {found} documents in its shards, {MANIFEST} says {n_docs}",
                               where=str(root / f"domain={d}"), fix="re-run `rnb tokenize` into a new --output")
            n_docs = found
        if n_docs == 0:
            raise RnbError(f"domain {d} has no documents", where=str(root / f"domain={d}"),
                           fix="drop the empty domain (regroup with fewer domains) and re-run `rnb tokenize`")
    return td


def check_tokenizer(td: TokenDir, info: dict[str, Any], where: str) -> None:
    """Refuse to train with a tokenizer other than the one the shards were written with."""
    mine = td.tokenizer
    diffs = [f"{k}: shards {mine.get(k)!r}, now {info[k]!r}" for k in ("vocab_size", "eos_id", "vocab_sha256")
             if mine.get(k) != info[k]]
    if diffs:
        raise RnbError(f"the token shards were written with tokenizer {mine.get('name')!r}, this run uses "
                       f"{info['name']!r} ({'; '.join(diffs)})", where=str(td.root / MANIFEST),
                       fix=f"train with --tokenizer {mine.get('name')} (or its model), or re-run `rnb tokenize` "
                           "with this run's tokenizer")
