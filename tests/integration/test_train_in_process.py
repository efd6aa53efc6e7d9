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
