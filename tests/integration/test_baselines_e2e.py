"""The four baselines end to end on real Ray Train (2 gloo workers) through ``rnb train``, and their
extra-compute accounting checked against the passes they make. One short trainer run per strategy."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.plan import SourceReader, prepare_plan, worker_eval_set
from rnb_ray.cli import main

MODULES = ["asyncio", "email", "logging"]
SEQ, BATCH, K, STEPS, WORKERS = 16, 4, 3, 12, 2
ROUNDS = STEPS // K
COMMON = ["--batch-size", str(BATCH), "--seq-len", str(SEQ), "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
          "--tokenizer", "byte", "--update-every", str(K), "--steps", str(STEPS), "--eval-every", str(STEPS),
          "--eval-max-per-domain", "6", "--lr", "3e-3", "--warmup-steps", "2", "--workers", str(WORKERS)]


@pytest.fixture(scope="module")
def corpus(sample_corpus, tmp_path_factory):
    """Three modules' docstrings, each at least 64 characters: every example fills the 16-byte context, so
    every evaluation batch is exactly SEQ tokens long and the FLOPs of each pass are known exactly."""
    t = pq.read_table(sample_corpus)
    t = t.filter(pc.is_in(t["source"], value_set=pa.array(MODULES)))
    t = t.filter(pc.greater_equal(pc.utf8_length(t["text"]), 64))
    path = tmp_path_factory.mktemp("baselines") / "corpus.parquet"
    pq.write_table(t, path)
    return path


def _config(corpus: Path, strategy: str, out: Path) -> TrainConfig:
    return TrainConfig(data=str(corpus), output=str(out), domain_column="source", strategy=strategy,
                       batch_size=BATCH, seq_len=SEQ, tokenizer="byte", eval_max_per_domain=6, workers=WORKERS)


def _eval_examples(cfg: TrainConfig) -> tuple[int, list[int]]:
    """(evaluation examples over all workers, each worker's evaluation-pool size) — from the data plan."""
    plan = prepare_plan(cfg)
    reader = SourceReader(plan)
    pools = [sum(len(t) for t in worker_eval_set(plan, r, WORKERS, reader)) for r in range(WORKERS)]
    return sum(pools), pools


@pytest.fixture(scope="module")
def runs(ray_session, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-runs")
    out = {}
    for strategy, options in [("dga", None), ("doge", None), ("skillit", None), ("aioli", '{"one_hot_factor": 0.7}')]:
        run = root / strategy
        args = ["train", "--data", str(corpus), "--domain-column", "source", "--output", str(run),
                "--strategy", strategy, *COMMON]
        if options:
            args += ["--strategy-options", options]
        assert main(args) == 0
        out[strategy] = run
    return out


def _read(run: Path) -> tuple[list[dict], dict, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run / "mixture.json").read_text()), json.loads((run / "result.json").read_text())


@pytest.mark.parametrize("strategy", ["dga", "doge", "skillit", "aioli"])
def test_baseline_runs_and_updates_every_round(runs, strategy):
    rows, mixture, _ = _read(runs[strategy])
    assert mixture["strategy"] == strategy and mixture["domains"] == sorted(MODULES)
    traj = mixture["trajectory"]
    assert [t["round"] for t in traj] == list(range(-1, ROUNDS))
    assert all(t["skipped"] is None for t in traj[1:]), [t["skipped"] for t in traj]
    assert all(abs(sum(t["mixture"]) - 1) < 1e-9 and min(t["mixture"]) > 0 for t in traj)
    assert max(abs(x - 1 / 3) for t in traj[1:] for x in t["mixture"]) > 1e-3  # p moves
    assert rows[-1]["step"] == STEPS and rows[-1]["eval_loss"] is not None


def test_aioli_runs_its_learnparams_schedule(runs):
    _, mixture, _ = _read(runs["aioli"])
    traj = [t["mixture"] for t in mixture["trajectory"]]
    assert traj[0] == pytest.approx([1 / 3] * 3)  # round 0 trains on the uniform mixture
    learn = traj[1:4]  # then one smoothed one-hot mixture per domain (one_hot_factor 0.7 from the CLI)
    assert sorted(max(range(3), key=lambda i: p[i]) for p in learn) == [0, 1, 2]
    for p in learn:
        assert sorted(p) == pytest.approx([0.15, 0.15, 0.7])
    assert max(traj[4]) < 0.7 and traj[4] not in learn  # the exploit mixture from the solved mixing law


@pytest.mark.parametrize("strategy", ["dga", "doge"])
def test_eval_gradient_cost_is_one_forward_backward_batch_per_worker_per_round(runs, corpus, strategy):
    rows, _, result = _read(runs[strategy])
    n = result["n_params_matmul"]
    _, pools = _eval_examples(_config(corpus, strategy, runs[strategy]))
    per_round = sum(6.0 * n * min(BATCH, pool) * SEQ for pool in pools)
    assert rows[-1]["extra_flops"] == pytest.approx(ROUNDS * per_round, rel=1e-9)
    assert rows[-1]["extra_seconds"] > 0


@pytest.mark.parametrize("strategy", ["skillit", "aioli"])
def test_eval_loss_cost_is_one_forward_over_the_evaluation_set_per_round(runs, corpus, strategy):
    rows, _, result = _read(runs[strategy])
    n = result["n_params_matmul"]
    total, _ = _eval_examples(_config(corpus, strategy, runs[strategy]))
    assert total > 0
    assert rows[-1]["extra_flops"] == pytest.approx(ROUNDS * 2.0 * n * total * SEQ, rel=1e-9)
    assert rows[-1]["extra_seconds"] > 0
