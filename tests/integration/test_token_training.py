"""`rnb tokenize` on real Ray Data (2 tokenizer actors) and training on its shards: the shards read back as
the tokenizer's output, `rnb train --data TOK_OUT` packs from the CLI on Ray Train, a stopped-and-resumed
in-process run follows the same trajectory, and bad inputs fail in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.lm import load_tokenizer
from rnb_ray.balance.trainer import run_training_loop
from rnb_ray.cli import main
from rnb_ray.tokens.encode import encode_documents
from rnb_ray.tokens.shards import open_token_dir

MODULES = ["asyncio", "decimal", "email"]
TINY = dict(tokenizer="byte", batch_size=4, seq_len=32, n_layer=1, n_embd=16, n_head=2, update_every=2,
            eval_every=4, log_every=2, workers=1, eval_max_per_domain=8)


@pytest.fixture(scope="module")
def regrouped(sample_corpus, tmp_path_factory):
    """A regroup-style output: data/domain=<id>/part-0.parquet (with the column, several row groups)."""
    out = tmp_path_factory.mktemp("regrouped_tok")
    table = pq.read_table(sample_corpus)
    for i, name in enumerate(MODULES):
        part = out / "data" / f"domain={i}"
        part.mkdir(parents=True)
        t = table.filter(pc.equal(table["source"], name)).slice(0, 60)
        t = t.append_column("domain", pa.array([i] * t.num_rows, pa.int64()))
        pq.write_table(t, part / "part-0.parquet", row_group_size=25)
    (out / "domains.json").write_text(json.dumps({"k": 3, "sizes": {str(i): 60 for i in range(3)}}))
    return out


@pytest.fixture(scope="module")
def tokens(ray_session, regrouped, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokens"
    assert main(["tokenize", "--data", str(regrouped), "--output", str(out), "--tokenizer", "byte",
                 "--workers", "2"]) == 0
    return out


def test_tokenize_writes_the_tokenizers_ids_per_domain(tokens, regrouped):
    td = open_token_dir(tokens)
    m = td.manifest
    assert td.domains == ["0", "1", "2"] and m["dtype"] == "uint16" and m["tokenizer"]["name"] == "byte"
    assert (tokens / "domains.json").read_bytes() == (regrouped / "domains.json").read_bytes()
    assert not list(tokens.parent.glob(".tokens.tmp-*"))
    tok = load_tokenizer(None, "byte")
    for d in range(3):
        t = pq.read_table(regrouped / "data" / f"domain={d}" / "part-0.parquet")
        texts = [x for x in t["text"].to_pylist() if x and x.strip()]
        want = encode_documents(tok, texts, tok.eos_token_id)
        assert len(td.shards[d]) == 3  # one shard per row group
        got = [td.shard(rel).document(i) for rel in td.shards[d] for i in range(len(td.shard(rel)))]
        assert len(got) == len(want) == m["by_domain"][str(d)]["documents"]
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        assert all(g[-1] == tok.eos_token_id for g in got)
    assert m["n_tokens"] == sum(len(x) for d in range(3) for x in
                                [td.shard(r).tokens for r in td.shards[d]])


def test_rnb_train_packs_token_shards_from_the_cli(tokens, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(tokens), "--output", str(run), "--tokenizer", "byte", "--workers", "1",
            "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--n-layer", "1", "--n-embd", "16",
            "--n-head", "2", "--update-every", "2", "--eval-every", "4", "--eval-max-per-domain", "4"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["tokens"] == rows[-1]["tokens_processed"] == 4 * 4 * 32  # no padding
    assert set(rows[-1]["eval_loss_by_domain"]) == {"0", "1", "2"}
    result = json.loads((run / "result.json").read_text())
    assert np.isfinite(result["final_eval_loss"])


def test_resume_from_token_shards_follows_the_same_trajectory(tokens, tmp_path):
    def rows(run: Path) -> list[dict]:
        out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("seconds") and k not in ("extra_seconds",)}
                for r in out]

    common = dict(data=str(tokens), steps=8, **TINY)
    straight = tmp_path / "straight"
    run_training_loop(TrainConfig(output=str(straight), **common).validate())
    half = tmp_path / "half"
    run_training_loop(TrainConfig(output=str(half), stop_after=4, **common).validate())
    assert [r["step"] for r in rows(half)] == [2, 4]
    run_training_loop(TrainConfig(output=str(half), **common).validate())
    assert rows(half) == rows(straight)  # losses, mixtures and counters: the packers resumed mid-document
    assert len({json.dumps(r["mixture"]) for r in rows(straight)}) > 1  # the mixture did move


def test_bad_inputs_fail_in_one_line_and_write_nothing(ray_session, tokens, regrouped, tmp_path, capsys):
    # Shards written with the byte tokenizer, trained with the default (BERT) one.
    run = tmp_path / "run"
    assert main(["train", "--data", str(tokens), "--output", str(run), "--workers", "1", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokens.json" in err and "tokenizer 'byte'" in err
    assert not run.exists()

    # A regrouped corpus where one file lacks the domain column (and sits outside domain=<id>/).
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    pq.write_table(pq.read_table(regrouped / "data" / "domain=0" / "part-0.parquet"), bad / "a.parquet")
    pq.write_table(pa.table({"text": ["no domain here"]}), bad / "x" / "b.parquet")
    out = tmp_path / "tok_bad"
    assert main(["tokenize", "--data", str(bad), "--output", str(out), "--tokenizer", "byte", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b.parquet has no domain column 'domain'" in err
    assert not out.exists() and not list(tmp_path.glob(".tok_bad*"))

    # A truncated shard: training refuses it, naming the file.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tokens, broken)
    b = broken / "domain=2" / "part-00006.bin"
    b.write_bytes(b.read_bytes()[:-10])
    assert main(["train", "--data", str(broken), "--output", str(run), "--tokenizer", "byte", "--workers", "1",
                 "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "domain=2/part-00006" in err and "corrupt" in err
    assert not run.exists()
