"""The README's Ray Data snippet: `rnb export --format hf`, then `Dataset.mix(weights=...)` (alpha in Ray 2.60)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnb_ray.export import export
from rnb_ray.outputs import domain_dir


def test_ray_data_mix_follows_the_exported_mixture(ray_session, tmp_path):
    ray = ray_session
    regroup, run = tmp_path / "regrouped", tmp_path / "run"
    for d in range(3):
        part = regroup / "data" / domain_dir(d)
        part.mkdir(parents=True)
        for f in range(8):  # several files per domain: Ray Data mixes whole blocks
            pq.write_table(pa.table({"text": [f"doc {d}-{f}-{i}" for i in range(25)], "domain": [d] * 25}),
                           part / f"part-{f}.parquet")
    (regroup / "domains.json").write_text(json.dumps({"k": 3, "sizes": {"0": 200, "1": 200, "2": 200}}))
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(regroup)}))
    (run / "mixture.json").write_text(json.dumps({"strategy": "rnb", "domains": ["0", "1", "2"],
                                                  "final": {"0": 0.5, "1": 0.25, "2": 0.25}, "trajectory": []}))

    # --- the snippet (README "Applying a mixture elsewhere") ---
    from ray.data import MixStoppingCondition

    spec = json.loads(export(run, "hf"))
    # mix() draws whole blocks: small blocks keep the ratio fine-grained
    parts = [ray.data.read_parquet(d).repartition(target_num_rows_per_block=10) for d in spec["data_dirs"]]
    mixed = parts[0].mix(*parts[1:], weights=spec["probabilities"],
                         stopping_condition=MixStoppingCondition.STOP_ON_SHORTEST)
    # ---
    domains = np.concatenate([b["domain"] for b in mixed.iter_batches(batch_size=None)])
    shares = np.bincount(domains, minlength=3) / len(domains)
    assert len(domains) >= 300  # domain 0 (p = 0.5) runs out first, after its 200 rows
    assert shares.tolist() == pytest.approx([0.5, 0.25, 0.25], abs=0.05)
