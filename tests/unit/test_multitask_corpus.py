"""The multi-task benchmark's corpus builder (benchmarks/multitask_corpus.py): its parsers on small real-format
inputs (WordNet data lines, a dictd index/dict pair), the task split and the rendered SNI-style text."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(_HERE))  # it imports benchmarks/fortunes.py by name
_spec = importlib.util.spec_from_file_location("multitask_corpus", _HERE / "multitask_corpus.py")
mc = importlib.util.module_from_spec(_spec)
sys.modules["multitask_corpus"] = mc  # dataclasses look their module up by name
_spec.loader.exec_module(mc)

# three real lines of WordNet 3.0's data.adj / data.noun (the offsets refer to each other)
ADJ = ("00001740 00 a 01 able 0 002 = 05200169 n 0000 ! 00002098 a 0101 | (usually followed by `to') having the "
       'necessary means or skill or know-how or authority to do something; "able to swim"; "she was able to '
       'program her computer"\n'
       "00002098 00 a 01 unable 0 001 ! 00001740 a 0101 | (usually followed by `to') not having the necessary "
       'means or skill or know-how; "unable to get to town without a car"\n')
NOUN = ("05200169 07 n 01 ability 0 001 = 00001740 a 0000 | the quality of being able to perform\n")


def test_wordnet_lines_become_tasks(tmp_path):
    (tmp_path / "data.adj").write_text("  1 license header line\n" + ADJ)
    (tmp_path / "data.noun").write_text(NOUN)
    (tmp_path / "data.verb").write_text("")
    (tmp_path / "data.adv").write_text("")
    syn = mc.read_wordnet(tmp_path)
    assert set(syn) == {("a", 1740), ("a", 2098), ("n", 5200169)}
    able = syn[("a", 1740)]
    assert able.words == ["able"] and able.lexname == "adj.all" and able.examples[0] == "able to swim"
    assert syn[("n", 5200169)].lexname == "noun.attribute"
    t = mc.wordnet_tasks(syn)
    assert ("able", "unable") in t["wn_antonym"] and ("unable", "able") in t["wn_antonym"]
    assert ("able", "ability") in t["wn_attribute"]
    # the word blanked in its own usage example; examples barely longer than the word are skipped
    assert t["wn_fill_blank"][0] == ("she was ____ to program her computer", "able")
    assert ("the quality of being able to perform", "noun") in t["wn_pos"]


def test_dictd_index_offsets_are_base64(tmp_path):
    body = b"alpha\n   first entry\n\nbeta\n   second\n"
    (tmp_path / "x.dict.dz").write_bytes(gzip.compress(body))
    # dictd's base-64 digits: 'A'=0 ... 'Z'=25; "beta" starts at byte 22 ('W') and is 15 bytes long ('P')
    (tmp_path / "x.index").write_text("00-database-info\tA\tB\nalpha\tA\tW\nbeta\tW\tP\n")
    assert mc._b64("W") == 22 and mc._b64("BA") == 64
    assert mc.read_dictd("x", tmp_path) == [("alpha", "alpha\n   first entry\n\n"), ("beta", "beta\n   second\n")]


def test_split_holds_out_examples_of_every_seen_task_and_whole_unseen_tasks(monkeypatch):
    tasks = [mc.Task("big", "S", "Do big.", 100), mc.Task("small", "S", "Do small.", 10),
             mc.Task("held", "S", "Do held.", 0)]
    monkeypatch.setattr(mc, "TASKS", tasks)
    raw = {name: [(f"{name} in {i}", f"out {i}") for i in range(n)] for name, n in
           (("big", 300), ("small", 80), ("held", 200))}
    parts = mc.split_tasks(raw, seed=1)
    by = {p: {t.name: [r for r in rows if r["task"] == t.name] for t in tasks} for p, rows in parts.items()}
    assert len(by["train"]["big"]) == 100 and len(by["train"]["small"]) == 10  # capped: sizes stay imbalanced
    assert not by["train"]["held"] and not by["val"]["held"] and not by["test"]["held"]
    assert len(by["unseen_val"]["held"]) == mc.VAL_PER_TASK and len(by["unseen_test"]["held"]) == mc.UNSEEN_TEST_PER_TASK
    ids = [r["id"] for rows in parts.values() for r in rows]
    assert len(ids) == len(set(ids))  # no example in two parts
    assert by["train"]["big"][0]["text"].startswith("Instruction: Do big.\nInput: big in ")
    assert parts == mc.split_tasks(raw, seed=1) and parts != mc.split_tasks(raw, seed=2)  # deterministic
    raw["small"] = raw["small"][:30]
    with pytest.raises(mc.CorpusError, match="small has only 30"):
        mc.split_tasks(raw, seed=1)
