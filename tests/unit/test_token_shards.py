"""Token shards: the Megatron indexed-dataset format read back and checked byte by byte against its layout,
the manifest checks training relies on (tokenizer, corrupt shards, empty domains), and byte encoding."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from rnb_ray.balance.lm import load_tokenizer
from rnb_ray.errors import RnbError
from rnb_ray.tokens.encode import encode_documents, tokenizer_info
from rnb_ray.tokens.indexed import ShardError, check_shard, open_shard, read_sizes, token_dtype, write_shard
from rnb_ray.tokens.shards import FORMAT, check_tokenizer, is_token_dir, open_token_dir


def _docs(seed: int, n: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("vocab", [259, 70_000])
def test_round_trip_and_idx_layout_match_megatron(tmp_path, vocab):
    docs = _docs(0, 25, vocab)
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)
    n, t = write_shard(tmp_path / "part-00000", docs, dtype)
    assert (n, t) == (25, sum(len(d) for d in docs))
    shard = open_shard(tmp_path / "part-00000")
    assert len(shard) == 25 and shard.n_tokens == t
    assert check_shard(tmp_path / "part-00000") == (25, t)  # the O(1) check the driver runs
    np.testing.assert_array_equal(read_sizes(tmp_path / "part-00000"), [len(d) for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(shard.document(i), d)

    # Independent parse of the .idx, following Megatron-LM's _IndexWriter field by field.
    raw = (tmp_path / "part-00000.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, seqs, doc_count = struct.unpack_from("<QBQQ", raw, 9)
    assert version == 1 and code == (8 if vocab < 65500 else 4) and seqs == 25 and doc_count == 26
    off = 9 + 8 + 1 + 8 + 8
    lengths = struct.unpack_from(f"<{seqs}i", raw, off)
    pointers = struct.unpack_from(f"<{seqs}q", raw, off + 4 * seqs)
    doc_idx = struct.unpack_from(f"<{doc_count}q", raw, off + 12 * seqs)
    assert len(raw) == off + 12 * seqs + 8 * doc_count
    assert list(lengths) == [len(d) for d in docs]
    item = np.dtype(dtype).itemsize
    assert list(pointers) == [item * sum(len(d) for d in docs[:i]) for i in range(25)]
    assert list(doc_idx) == list(range(26))
    flat = np.frombuffer((tmp_path / "part-00000.bin").read_bytes(), dtype=np.dtype(dtype).newbyteorder("<"))
    np.testing.assert_array_equal(flat, np.concatenate(docs))


def test_corrupt_shards_are_refused(tmp_path):
    write_shard(tmp_path / "a", _docs(1, 5, 200), np.uint16)
    shutil.copy(tmp_path / "a.idx", tmp_path / "b.idx")
    (tmp_path / "b.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-2])  # one token short
    with pytest.raises(ShardError, match="b.bin holds"):
        open_shard(tmp_path / "b")
    with pytest.raises(ShardError, match="b.bin holds"):
        check_shard(tmp_path / "b")
    (tmp_path / "c.idx").write_bytes(b"NOTMAGIC!" + (tmp_path / "a.idx").read_bytes()[9:])
    shutil.copy(tmp_path / "a.bin", tmp_path / "c.bin")
    with pytest.raises(ShardError, match="bad magic"):
        open_shard(tmp_path / "c")
    (tmp_path / "d.idx").write_bytes((tmp_path / "a.idx").read_bytes()[:40])
    shutil.copy(tmp_path / "a.bin", tmp_path / "d.bin")
    with pytest.raises(ShardError, match="truncated"):
        open_shard(tmp_path / "d")


def test_byte_fast_path_equals_byt5_tokenizer():
    tok = load_tokenizer(None, "byte")
    texts = ["hello world", "ünïcödé ✓", "a"]
    fast = encode_documents(tok, texts, end=tok.eos_token_id)
    slow = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert [f.tolist() for f in fast] == slow


def make_token_dir(root: Path, per_domain: dict[str, list[list[np.ndarray]]], tok_name: str = "byte") -> Path:
    """A token directory as `rnb tokenize` writes it (shards + tokens.json), built without Ray."""
    info = tokenizer_info(load_tokenizer(None, tok_name), tok_name)
    by: dict = {}
    for d, shards in per_domain.items():
        (root / f"domain={d}").mkdir(parents=True)
        by[d] = {"documents": 0, "tokens": 0, "shards": []}
        for i, docs in enumerate(shards):
            rel = f"domain={d}/part-{i:05d}"
            n, t = write_shard(root / rel, docs, token_dtype(info["vocab_size"]))
            by[d]["documents"] += n
            by[d]["tokens"] += t
            by[d]["shards"].append(rel)
    (root / "tokens.json").write_text(json.dumps({"format": FORMAT, "format_version": 1, "tokenizer": info,
                                                  "domains": list(per_domain), "by_domain": by}))
    return root


def test_token_dir_checks(tmp_path):
    tok = load_tokenizer(None, "byte")
    docs = {"0": [encode_documents(tok, ["abc", "de"], 1)], "1": [encode_documents(tok, ["xyz"] * 3, 1)]}
    good = make_token_dir(tmp_path / "good", docs)
    td = open_token_dir(good)
    assert td.domains == ["0", "1"] and is_token_dir(good)
    check_tokenizer(td, tokenizer_info(tok, "byte"), "--data")

    bert = tokenizer_info(load_tokenizer(None, None), "bert")  # the offline default tokenizer
    with pytest.raises(RnbError, match="written with tokenizer 'byte'.*tokens.json"):
        check_tokenizer(td, bert, "--data")

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "tokens.json").unlink()
    assert is_token_dir(missing)
    with pytest.raises(RnbError, match="no tokens.json"):
        open_token_dir(missing)

    trunc = tmp_path / "trunc"
    shutil.copytree(good, trunc)
    b = trunc / "domain=1" / "part-00000.bin"
    b.write_bytes(b.read_bytes()[:-1])
    with pytest.raises(RnbError, match=r"domain=1/part-00000.*corrupt"):
        open_token_dir(trunc)

    empty = make_token_dir(tmp_path / "empty", {"0": docs["0"], "1": [[]]})
    with pytest.raises(RnbError, match=r"domain 1 has no documents.*domain=1"):
        open_token_dir(empty)


def test_worker_keeps_a_bounded_number_of_shards_open(tmp_path):
    from rnb_ray.balance.token_plan import ShardCache

    for i in range(5):
        write_shard(tmp_path / f"p{i}", _docs(i, 3, 200), np.uint16)
    cache = ShardCache(max_open=2)
    first = cache.get(str(tmp_path), "p0")
    assert cache.get(str(tmp_path), "p0") is first  # reused while recent
    for i in range(1, 5):
        np.testing.assert_array_equal(cache.get(str(tmp_path), f"p{i}").document(0), _docs(i, 3, 200)[0])
    assert len(cache._open) == 2 and cache.get(str(tmp_path), "p0") is not first  # evicted, reopened


def test_token_plan_split_and_worker_shares(tmp_path):
    """The plan counts tokens per domain from the split; two workers' documents are disjoint, cover every
    training document, and never include a held-out one (the split of balance/split.py, per shard path)."""
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.split import is_heldout, source_key
    from rnb_ray.balance.token_plan import ShardCache, ShardReader, prepare_token_plan, token_worker_data

    tok = load_tokenizer(None, "byte")
    texts = [f"document {i} " + "z" * (i % 11) for i in range(120)]
    docs = encode_documents(tok, texts, 1)
    root = make_token_dir(tmp_path / "tok", {"0": [docs[:50], docs[50:80]], "1": [docs[80:]]})
    cfg = TrainConfig(data=str(root), output=str(tmp_path / "run"), tokenizer="byte", seq_len=16, eval_fraction=0.2)
    plan = prepare_token_plan(cfg)
    held0 = np.concatenate([is_heldout(source_key(f"domain=0/part-0000{i}"), np.arange(n), 0, 0.2)
                            for i, n in enumerate([50, 30])])
    assert plan.doc_counts[0] == (~held0).sum() and 0 < held0.sum() < 80
    assert plan.sizes[0] == sum(len(d) for d, h in zip(docs[:80], held0, strict=True) if not h)
    assert plan.eval_sizes[0] == sum(len(d) for d, h in zip(docs[:80], held0, strict=True) if h)
    shares = []
    for rank in range(2):
        packers, evals = token_worker_data(plan, rank, 2, seed=0)
        shares.append(set(packers[0].docs.tolist()))
        assert all(len(s) == 16 for s in evals[0])
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(np.flatnonzero(~held0).tolist())
    reader = ShardReader(plan.train[0], ShardCache())
    np.testing.assert_array_equal(reader(55), docs[55])  # document numbers run across the domain's shards


def test_readme_numpy_reader_reads_a_shard(tmp_path, monkeypatch):
    """The README's numpy-only reader, run as written on a real shard."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- readme-test: shard-numpy -->\n```python\n(.*?)```", readme, re.S).group(1)
    tok = load_tokenizer(None, "byte")
    docs = encode_documents(tok, ["first", "the second one", "3"], tok.eos_token_id)
    make_token_dir(tmp_path / "runs" / "tokens", {"0": [docs], "1": [docs[:1]]})
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README:shard-numpy", "exec"), scope)
    assert scope["n"] == 3 and scope["dtype"] is np.uint16
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(scope["doc"](i), d)


def test_token_plan_with_eval_data_token_dir(tmp_path):
    """--eval-data TOK_OUT2: nothing held out of training, q from the evaluation tokens, evaluation sequences
    packed from that directory; raw --eval-data with token --data is refused."""
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.token_plan import prepare_token_plan, token_worker_data

    tok = load_tokenizer(None, "byte")
    enc = lambda texts: encode_documents(tok, texts, 1)  # noqa: E731
    train = make_token_dir(tmp_path / "train", {"0": [enc(["aaaa"] * 10)], "1": [enc(["bb"] * 10)]})
    ev = make_token_dir(tmp_path / "eval", {"1": [enc(["zzzzzzz"] * 6)], "7": [enc(["q"])]})
    cfg = TrainConfig(data=str(train), eval_data=str(ev), output="x", tokenizer="byte", seq_len=8)
    plan = prepare_token_plan(cfg)
    assert plan.doc_counts.tolist() == [10, 10] and plan.q.tolist() == [0.0, 1.0] and plan.q_source == "eval_data"
    assert any("absent from training" in w for w in plan.warnings)
    _, evals = token_worker_data(plan, 0, 1, seed=0)
    assert evals[0] == [] and len(evals[1]) == 6 and all((s[s != 1] == ord("z") + 3).all() for s in evals[1])
    raw = tmp_path / "raw.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x"], "domain": [0]}), raw)
    with pytest.raises(RnbError, match="not a token-shard directory"):
        prepare_token_plan(TrainConfig(data=str(train), eval_data=str(raw), output="x", tokenizer="byte"))
