"""The real corpus for the fidelity benchmark: Debian's ``fortunes`` package as parquet.

Every file under /usr/share/games/fortunes/ is one category (the *original domain*); entries are
separated by lines holding only ``%``. This loader installs the package when it is missing
(``apt-get install -y fortunes``, needs root), strips terminal overstriking (``x\\b``), normalises
whitespace for deduplication (exact duplicates are kept once, in the first category in name order), drops
categories with fewer than ``--min-per-category`` entries, splits every category into train / held-out
with a fixed seed, and writes, atomically:

    OUT/train.parquet     id, text, source    (source = category = original domain)
    OUT/heldout.parquet   id, text, source
    OUT/manifest.json     counts per category, dropped categories, seed, fraction, package version
    OUT/tokenizer/        a byte-level BPE tokenizer (``--vocab-size``, default 4096) trained on the
                          train split only — small vocabularies keep the benchmark LM's output layer cheap

    python benchmarks/fortunes.py --output data/fortunes [--heldout-frac 0.1] [--seed 0]

It lives in benchmarks/ on purpose: the library reads parquet/jsonl/csv, not fortune files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rnb_ray.atomic import atomic_dir

FORTUNES_DIR = Path("/usr/share/games/fortunes")
_SEPARATOR = re.compile(r"(?m)^%[ \t]*$")
_OVERSTRIKE = re.compile(r".\x08")


class FortunesError(RuntimeError):
    pass


def ensure_installed(root: Path = FORTUNES_DIR) -> Path:
    """Return the fortunes directory, installing the Debian package first when it is missing."""
    if root.is_dir() and any(root.iterdir()):
        return root
    if shutil.which("apt-get") is None:
        raise FortunesError(f"{root} is missing and apt-get is not available; install the 'fortunes' "
                            "package (Debian/Ubuntu) or pass --source DIR with fortune files")
    cmd = ["apt-get", "install", "-y", "-q", "fortunes"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise FortunesError(f"{root} is missing; run `sudo apt-get install -y fortunes` and retry")
        cmd = ["sudo", "-n", *cmd]
    print("installing the fortunes package:", " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        # a stale package index is the usual cause: refresh once and retry
        subprocess.run([*cmd[: cmd.index("install")], "update", "-q"], capture_output=True, text=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not root.is_dir():
        raise FortunesError(f"apt-get install fortunes failed: {done.stderr.strip()[-500:]}")
    return root


def category_files(root: Path) -> list[Path]:
    """The fortune text files: plain files without an extension (skips the .dat indexes and .u8 links)."""
    return sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)


def parse_entries(text: str) -> list[str]:
    """Split one fortune file into entries: '%' lines separate them; overstriking is removed."""
    text = _OVERSTRIKE.sub("", text.replace("\r\n", "\n"))
    return [e.strip("\n").rstrip() for e in _SEPARATOR.split(text) if e.strip()]


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_categories(root: Path) -> dict[str, list[str]]:
    """{category: deduplicated entries}; a duplicate text is kept in the first category (name order)."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for path in category_files(root):
        kept = []
        for entry in parse_entries(read_text(path)):
            key = " ".join(entry.split()).lower()
            if key in seen:
                continue
            seen.add(key)
            kept.append(entry)
        out[path.name] = kept
    return out


def split(categories: dict[str, list[str]], *, heldout_frac: float, seed: int,
          min_per_category: int) -> tuple[list[dict], list[dict], dict]:
    """Per-category seeded shuffle, then the first ceil(frac·n) (≥ 1) entries go to held-out."""
    train, heldout, counts, dropped = [], [], {}, {}
    for name in sorted(categories):
        entries = categories[name]
        if len(entries) < min_per_category:
            dropped[name] = len(entries)
            continue
        order = list(range(len(entries)))
        random.Random(f"{seed}:{name}").shuffle(order)
        n_held = max(1, round(heldout_frac * len(entries)))
        for rank, i in enumerate(order):
            row = {"id": f"{name}:{i}", "text": entries[i], "source": name}
            (heldout if rank < n_held else train).append(row)
        counts[name] = {"train": len(entries) - n_held, "heldout": n_held}
    return train, heldout, {"counts": counts, "dropped_small_categories": dropped}


def _table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
    })


def package_version() -> str | None:
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fortunes"], capture_output=True,
                              text=True)
        return done.stdout.strip() or None
    except OSError:
        return None


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE on the training texts (deterministic), saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", bos_token="<eos>")
    fast.save_pretrained(str(out_dir))


def build(output: Path, *, heldout_frac: float = 0.1, seed: int = 0, min_per_category: int = 20,
          source: Path | None = None, vocab_size: int = 4096) -> dict:
    """Write OUT/{train,heldout}.parquet and manifest.json atomically; returns the manifest."""
    if not 0 < heldout_frac < 1:
        raise FortunesError(f"--heldout-frac must be in (0, 1), got {heldout_frac}")
    root = source if source is not None else ensure_installed()
    if not root.is_dir():
        raise FortunesError(f"fortune directory {root} does not exist")
    categories = load_categories(root)
    if not categories:
        raise FortunesError(f"no fortune files found in {root}")
    train, heldout, info = split(categories, heldout_frac=heldout_frac, seed=seed,
                                 min_per_category=min_per_category)
    manifest = {
        "source_dir": str(root),
        "package_version": package_version() if source is None else None,
        "seed": seed,
        "heldout_frac": heldout_frac,
        "min_per_category": min_per_category,
        "tokenizer_vocab_size": vocab_size,
        "n_categories": len(info["counts"]),
        "n_train": len(train),
        "n_heldout": len(heldout),
        "n_duplicates_removed": sum(len(parse_entries(read_text(p))) for p in category_files(root))
        - sum(len(v) for v in categories.values()),
        **info,
    }
    with atomic_dir(output) as tmp:
        pq.write_table(_table(train), tmp / "train.parquet")
        pq.write_table(_table(heldout), tmp / "heldout.parquet")
        if vocab_size:
            train_tokenizer([r["text"] for r in train], tmp / "tokenizer", vocab_size)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--heldout-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-per-category", type=int, default=20)
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE tokenizer size (0: no tokenizer)")
    ap.add_argument("--source", type=Path, default=None, help="a directory of fortune files (default: the package)")
    args = ap.parse_args(argv)
    try:
        m = build(args.output, heldout_frac=args.heldout_frac, seed=args.seed,
                  min_per_category=args.min_per_category, source=args.source,
                  vocab_size=args.vocab_size)
    except FortunesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{m['n_categories']} categories, {m['n_train']} train / {m['n_heldout']} held-out entries "
          f"({m['n_duplicates_removed']} duplicates removed) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
