"""The training loop in process (no Ray Train, the mixer a local object: what sweep trials run): a run
stopped half-way and continued gives the same rows as one straight run, stale mixing included."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.trainer import run_training_loop


def test_in_process_loop_resumes_onto_the_same_trajectory(sample_corpus, tmp_path):
    t = pq.read_table(sample_corpus)
    t = t.filter(pc.is_in(t["source"], value_set=pa.array(["asyncio", "decimal", "email"])))
    data = tmp_path / "corpus.parquet"
    pq.write_table(t.append_column("domain", t["source"]), data)
    common = dict(data=str(data), tokenizer="byte", batch_size=4, seq_len=16, n_layer=1, n_embd=16, n_head=2,
                  update_every=2, steps=8, eval_every=4, log_every=2, workers=1, stale=True)

    def rows(run: Path) -> list[dict]:
        out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        # timings differ; with stale the mixer's FLOP count in a row depends on when its answer was read
        return [{k: v for k, v in r.items() if not k.startswith("seconds") and k not in ("extra_seconds",
                 "flops_balance")} for r in out]

    straight = tmp_path / "straight"
    summary = run_training_loop(TrainConfig(output=str(straight), **common).validate())
    assert summary["steps"] == 8 and summary["workers"] == 1
    half = tmp_path / "half"
    run_training_loop(TrainConfig(output=str(half), stop_after=4, **common).validate())
    assert [r["step"] for r in rows(half)] == [2, 4]
    run_training_loop(TrainConfig(output=str(half), checkpoint_every=2, **common).validate())
    assert rows(half) == rows(straight)  # losses, mixtures and counters, not only the trajectory
    mixture = torch.load(half / "mixer" / "state.pt", weights_only=True)["trajectory"]
    assert mixture == torch.load(straight / "mixer" / "state.pt", weights_only=True)["trajectory"]


def test_streams_resume_mid_block_onto_the_same_trajectory(sample_corpus, tmp_path):
    """Small row groups and a 3-example shuffle buffer: the checkpoint falls inside a block, inside a row group,
    and domains start new epochs after it; the continued run reads and trains on the same examples."""
    t = pq.read_table(sample_corpus)
    data = tmp_path / "regrouped"
    for i, name in enumerate(["asyncio", "decimal", "email"]):
        part = data / "data" / f"domain={i}"
        part.mkdir(parents=True)
        sub = t.filter(pc.equal(t["source"], name)).slice(0, 24)
        pq.write_table(sub.append_column("domain", pa.array([i] * sub.num_rows)), part / "part-0.parquet",
                       row_group_size=5)
    (data / "domains.json").write_text(json.dumps({"k": 3, "sizes": {"0": 24, "1": 24, "2": 24}}))
    common = dict(data=str(data), tokenizer="byte", batch_size=6, seq_len=16, n_layer=1, n_embd=16, n_head=2,
                  update_every=3, steps=12, eval_every=6, log_every=3, workers=1, shuffle_buffer=3,
                  eval_fraction=0.2, eval_max_per_domain=3, strategy="stratified")

    def rows(run: Path) -> list[dict]:
        out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "extra_seconds"} for r in out]

    straight = tmp_path / "straight"
    run_training_loop(TrainConfig(output=str(straight), **common).validate())
    half = tmp_path / "half"
    run_training_loop(TrainConfig(output=str(half), stop_after=3, **common).validate())
    ck = next((half / "checkpoints" / "local").glob("checkpoint_*"))
    streams = torch.load(ck / "trainer.pt", weights_only=True)["samplers"][0]["streams"]
    assert any(s["offset"] not in (0, 3) or s["row"] > 0 for s in streams)  # stopped inside a block / a unit
    run_training_loop(TrainConfig(output=str(half), **common).validate())
    assert rows(half) == rows(straight)  # losses are those of the same examples


def test_default_capture_sketches_a_head_over_budget_and_tracks_exact(sample_corpus, tmp_path):
    """When exact per-domain sums exceed --capture-budget-mb the default capture is the row hash with the most
    frequent tokens' rows exact (counted on a sample of the training data): the run says so in result.json, reports the sketch's expected Gram error per round, and its first mixing round gives a
    mixture close to exact capture's on the same batches (the first round samples with the same uniform p)."""
    t = pq.read_table(sample_corpus)
    t = t.filter(pc.is_in(t["source"], value_set=pa.array(["asyncio", "decimal", "email", "logging"])))
    data = tmp_path / "corpus.parquet"
    pq.write_table(t.append_column("domain", t["source"]), data)
    # The byte tokenizer's 259-row head, 32 wide: exact sums are 4 × 8,288 floats ≈ 0.25 MB (with the estimates)
    common = dict(data=str(data), tokenizer="byte", batch_size=8, seq_len=32, n_layer=1, n_embd=32, n_head=2,
                  update_every=4, steps=4, eval_every=4, log_every=4, workers=1, strategy="rnb", lam=10.0)
    runs = {}
    for name, extra in {"exact": {"sketch_dim": 0}, "auto": {"capture_budget_mb": 0.05}}.items():
        run = tmp_path / name
        run_training_loop(TrainConfig(output=str(run), **common, **extra).validate(), records=True)
        runs[name] = (json.loads((run / "result.json").read_text()),
                      [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()])
    (exact, exact_rows), (auto, auto_rows) = runs["exact"], runs["auto"]
    assert exact["capture"]["mode"] == "exact" and exact_rows[-1]["sketch_gram_rel_error"] is None
    cap = auto["capture"]
    assert cap["mode"] == "sketch" and cap["kind"] == "rowhash" and cap["numbers_per_domain"] == cap["sketch_dim"] * 32
    assert "exceed the budget" in cap["reason"] and "48 most frequent tokens' rows exact" in cap["reason"]
    err = auto_rows[-1]["sketch_gram_rel_error"]
    assert err is not None and 0 < err < 1
    p_exact, p_auto = (list(r[-1]["mixture"].values()) if isinstance(r[-1]["mixture"], dict) else r[-1]["mixture"]
                       for r in (exact_rows, auto_rows))
    l1 = sum(abs(a - b) for a, b in zip(p_exact, p_auto, strict=True))
    assert max(p_exact) - min(p_exact) > 0.02  # the round moved p, so agreement is not trivial
    assert l1 < 0.5 * sum(abs(a - 0.25) for a in p_exact), (p_exact, p_auto)


def test_a_round_with_more_domains_than_examples_keeps_a_row_per_domain_it_sees(sample_corpus, tmp_path):
    """12 domains, 2 examples a step, 2-step rounds: the per-domain sums take batch × update_every = 4 rows, not 12
    (``capture.sum_rows``), and the Gram matrix formed from those rows in place equals that of the round's
    per-domain means (the debug dump, gathered by domain)."""
    import numpy as np

    t = pq.read_table(sample_corpus)
    sources = ["asyncio", "logging", "email", "multiprocessing", "unittest", "decimal", "http", "inspect", "urllib",
               "collections", "ast", "pdb"]
    t = t.filter(pc.is_in(t["source"], value_set=pa.array(sources)))
    data = tmp_path / "corpus.parquet"
    pq.write_table(t.append_column("domain", t["source"]), data)
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(data), output=str(run), tokenizer="byte", batch_size=2, seq_len=16, n_layer=1,
                      n_embd=16, n_head=2, update_every=2, steps=6, eval_every=6, log_every=2, workers=1,
                      strategy="rnb", debug_dump_rounds=3)
    run_training_loop(cfg.validate(), records=True)
    result = json.loads((run / "result.json").read_text())
    assert result["capture"]["mode"] == "exact" and result["capture"]["sum_rows"] == 4
    assert result["rounds"] == 3 and result["skipped_rounds"] == 0
    est = np.zeros((12, result["capture"]["numbers_per_domain"]))
    for r in range(3):
        dumped = np.load(run / "debug" / f"round_{r:04d}_grads.npz")
        seen = dumped["counts"] > 0
        assert 1 <= seen.sum() <= 4
        est[seen] = dumped["grads"][seen]  # absent domains keep their last estimate
        gram = np.load(run / "mixer" / f"round_{r:04d}.npz")["gram"]
        np.testing.assert_allclose(gram, est @ est.T, rtol=1e-4, atol=1e-9)
