"""The fidelity benchmark's corpus loader (benchmarks/fortunes.py) on small real fortune files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq

_spec = importlib.util.spec_from_file_location(
    "fortunes_loader", Path(__file__).parents[2] / "benchmarks" / "fortunes.py"
)
fortunes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fortunes)


def _write(root: Path) -> None:
    (root / "alpha").write_text("one\n%\ntwo\n  lines\n%\nthree\n%\n" + "".join(f"a{i}\n%\n" for i in range(20)))
    (root / "beta").write_text("Two\n  LINES\n%\n_\bb_\bo_\bl_\bd\n%\n" + "".join(f"b{i}\n%\n" for i in range(20)))
    (root / "tiny").write_text("only\n%\n")
    (root / "alpha.dat").write_bytes(b"\x00\x01")


def test_parse_dedupe_split_and_write(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src)
    assert fortunes.parse_entries("a\n%\n\n%\nb\nc\n%\n") == ["a", "b\nc"]
    m = fortunes.build(tmp_path / "out", heldout_frac=0.25, seed=3, min_per_category=5, source=src,
                       vocab_size=300)
    train = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    held = pq.read_table(tmp_path / "out" / "heldout.parquet").to_pylist()
    texts = [r["text"] for r in train + held]
    assert "bold" in texts  # overstriking removed
    assert sum(t.lower().split() == ["two", "lines"] for t in texts) == 1  # whitespace/case duplicate dropped
    assert {r["source"] for r in train + held} == {"alpha", "beta"}  # 'tiny' below the minimum
    assert m["dropped_small_categories"] == {"tiny": 1}
    assert m["counts"]["alpha"] == {"train": 17, "heldout": 6}  # 23 entries, round(0.25·23) = 6
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    # fixed seed: the same split again; another seed: a different one
    again = fortunes.build(tmp_path / "out2", heldout_frac=0.25, seed=3, min_per_category=5, source=src,
                           vocab_size=0)
    assert again["counts"] == m["counts"]
    assert pq.read_table(tmp_path / "out2" / "heldout.parquet").to_pylist() == held
    fortunes.build(tmp_path / "out3", heldout_frac=0.25, seed=4, min_per_category=5, source=src, vocab_size=0)
    assert pq.read_table(tmp_path / "out3" / "heldout.parquet").to_pylist() != held
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["n_heldout"] == len(held)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    ids = tok("two lines")["input_ids"]
    assert ids and max(ids) < 300 and tok.decode(ids) == "two lines" and tok.pad_token == "<pad>"
