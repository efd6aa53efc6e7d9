"""The worked example examples/ray_train_rnb.py: a user-written Ray Train train_func using rnb_ray.api, run
small on real Ray (2 gloo workers, a tiny GPT-2, 10 steps, two mixing rounds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rnb_ray.api import load_state

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_train_rnb.py"


def _example():
    from ray import cloudpickle

    spec = importlib.util.spec_from_file_location("ray_train_rnb_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    cloudpickle.register_pickle_by_value(mod)  # workers cannot import examples/ (not a package)
    return mod


def test_ray_train_example_records_a_moving_mixture(ray_session, sample_corpus, tmp_path):
    ex = _example()
    table = pq.read_table(sample_corpus).to_pydict()
    texts = {}
    for d, t in zip(table["source"], table["text"], strict=True):
        if d in ("asyncio", "decimal", "email", "logging"):
            texts.setdefault(d, []).append(t)
    run = tmp_path / "run"
    summary = ex.run(run, texts, steps=10, workers=2, update_every=5, batch_size=8, seq_len=64)
    assert summary["rounds"] == 2
    mixture = json.loads((run / "mixture.json").read_text())
    assert mixture["domains"] == ["asyncio", "decimal", "email", "logging"]
    traj = mixture["trajectory"]
    assert [(t["round"], t["step"]) for t in traj] == [(-1, 0), (0, 5), (1, 10)]
    assert traj[0]["mixture"] == [0.25] * 4
    assert max(abs(x - 0.25) for x in traj[-1]["mixture"]) > 0.01  # p moved
    assert mixture["final"] == dict(zip(mixture["domains"], traj[-1]["mixture"], strict=True))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10] and rows[-1]["mixture"] == traj[-1]["mixture"]
    # Both ranks' sampler states landed in the one final checkpoint.
    ckpt = Path(summary["checkpoint"])
    assert ckpt.parent.parent == run and {"sampler_rank0.pt", "sampler_rank1.pt", "mixer.pt", "model.pt"} <= {
        p.name for p in ckpt.iterdir()}
    state = load_state(ckpt / "sampler_rank1.pt")  # weights_only=True
    assert len(state["streams"]) == 4
    mixer0 = load_state(ckpt / "mixer.pt")
    assert mixer0["trajectory"][-1]["mixture"] == traj[-1]["mixture"]
    # The sums were reduced over the 2 workers' process group: each rank holds half the head's columns of the
    # domain estimates, and both hold the same (non-zero) Gram matrix.
    est0, est1 = mixer0["client_estimates"], load_state(ckpt / "mixer_rank1.pt")["client_estimates"]
    head = torch.load(ckpt / "model.pt", weights_only=True)["lm_head.weight"].numel()
    assert est0["est"].shape == est1["est"].shape == (4, -(-head // 2))
    assert torch.equal(est0["gram"], est1["gram"]) and float(est0["gram"].abs().sum()) > 0


def test_join_unknown_mixer_is_rnb_error(ray_session):
    from rnb_ray.api import DomainMixer
    from rnb_ray.errors import RnbError

    with pytest.raises(RnbError, match="no mixer actor named 'no-such-mixer'"):
        DomainMixer.join("no-such-mixer")
