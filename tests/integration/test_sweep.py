"""`rnb sweep`: a real Ray Tune sweep over k on a small real corpus (2 CPUs), failure and resume."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rnb_ray.errors import RnbError
from rnb_ray.sweep.config import SweepConfig
from rnb_ray.sweep.tune import FAIL_ENV, run_sweep

# A tiny proxy model: the sweep's logic is under test, not the model.
TINY_TRAIN = {"n_layer": 1, "n_head": 2, "n_embd": 32, "seq_len": 32, "batch_size": 4,
              "eval_max_per_domain": 16, "update_every": 5, "lr": 3e-3, "warmup_steps": 2}


def small_corpus(sample_corpus: Path, base: Path) -> Path:
    """~360 documents of the embedded corpus (every 6th row: all modules represented), written once."""
    path = base / "sweep-small.parquet"
    if not path.exists():
        t = pq.read_table(sample_corpus)
        pq.write_table(t.take(list(range(0, t.num_rows, 6))), path)
    return path


def tiny_train_config(base: Path) -> Path:
    path = base / "tiny-train.json"
    if not path.exists():
        path.write_text(json.dumps(TINY_TRAIN))
    return path


@pytest.fixture(scope="module")
def sweep_out(ray_session, sample_corpus, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    out = tmp_path_factory.mktemp("sweep") / "out"
    cfg = SweepConfig(input=str(small_corpus(sample_corpus, base)), output=str(out), k=(2, 3, 4, 5),
                      trial_steps=10, eval_every=5, grace_steps=5, domain_column="source",
                      train_config=str(tiny_train_config(base)), cache_dir=str(base / "rnb-cache"),
                      silhouette_sample=200, write_best=True)
    import os

    os.environ[FAIL_ENV] = "5"  # the k=5 trial raises after clustering
    try:
        doc = run_sweep(cfg)
    finally:
        os.environ.pop(FAIL_ENV, None)
    return cfg, out, doc


def test_sweep_finishes_picks_k_and_reports_the_failed_trial(sweep_out):
    cfg, out, doc = sweep_out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [int(r["k"]) for r in rows] == [2, 3, 4, 5]
    by_k = {int(r["k"]): r for r in rows}
    assert by_k[5]["status"] == "failed" and "injected failure for k=5" in by_k[5]["error"]
    finished = [by_k[k] for k in (2, 3, 4)]
    assert all(r["status"] in ("completed", "stopped") for r in finished)
    assert any(r["status"] == "completed" and int(r["steps"]) == 10 for r in finished)
    for r in finished:
        assert 0 < float(r["eval_loss"]) < 20
        assert -1 <= float(r["silhouette"]) <= 1
        assert float(r["inertia"]) > 0
        assert 1 <= int(r["smallest_domain"]) <= int(r["largest_domain"])
    best = json.loads((out / "best.json").read_text())
    completed = [r for r in finished if r["status"] == "completed"]
    assert best["k"] == int(min(completed, key=lambda r: float(r["eval_loss"]))["k"])
    # Silhouette vs loss over the three k that trained.
    (g,) = doc["silhouette_vs_loss"]
    assert g["strategy"] == "stratified" and g["n"] >= 2
    # The regrouped corpus for the best k, ready for `rnb train`.
    domains = json.loads((out / "regrouped" / "domains.json").read_text())
    assert domains["k"] == best["k"] and best["regrouped"] == str(out / "regrouped")
    assert sum(domains["sizes"].values()) == doc["n_documents"]


def test_every_k_trained_on_the_same_heldout_documents(sweep_out):
    _, out, doc = sweep_out
    heldout = []
    for d in sorted((out / "trials").iterdir()):
        if (d / "heldout.parquet").exists():
            heldout.append(sorted(pq.read_table(d / "heldout.parquet").column("text").to_pylist()))
    assert len(heldout) == 3  # the failing trial raised before writing its files
    assert all(h == heldout[0] for h in heldout) and len(heldout[0]) == doc["heldout_documents"] > 0


def test_resume_keeps_finished_trials(sweep_out, ray_session):
    cfg, out, doc = sweep_out
    import dataclasses

    t0 = time.perf_counter()
    again = run_sweep(dataclasses.replace(cfg, write_best=False))  # Tuner.restore; k=5 restarts and now works
    assert time.perf_counter() - t0 > 0
    before = {t["trial_id"]: t for t in doc["trials"]}
    after = {t["trial_id"]: t for t in again["trials"]}
    assert set(before) == set(after)  # the same trials, restored rather than started anew
    for tid, t in before.items():
        if t["status"] != "failed":
            assert after[tid]["eval_loss"] == t["eval_loss"]  # finished trials are not re-run
    assert {t["k"]: t["status"] for t in again["trials"]}[5] in ("completed", "stopped")


def test_bad_input_is_refused_before_ray_work(sample_corpus, tmp_path):
    base = dict(input=str(sample_corpus), output=str(tmp_path / "o"))
    with pytest.raises(RnbError, match="k list is empty"):
        run_sweep(SweepConfig(**base, k=()))
    with pytest.raises(RnbError, match="at least 2"):
        run_sweep(SweepConfig(**base, k=(1, 4)))
    with pytest.raises(RnbError, match="exceeds the .* documents"):
        run_sweep(SweepConfig(**base, k=(4, 100000)))
    with pytest.raises(RnbError, match="trial_steps must be positive"):
        run_sweep(SweepConfig(**base, trial_steps=0))
    with pytest.raises(RnbError, match="does not exist"):
        run_sweep(SweepConfig(input=str(tmp_path / "nope.parquet"), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # nothing written
