"""Balance on real Ray Train (2 gloo workers), real torch models, real parquet — kept to five small trainer runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from rnb_ray.balance.capture import find_capture_modules
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.lm import build_model, load_tokenizer, per_example_loss
from rnb_ray.balance.train import train
from rnb_ray.cli import main
from rnb_ray.errors import RnbError

MODULES = ["asyncio", "decimal", "email", "logging"]
# Small and fast: byte tokenizer (259-token head), one block of width 32.
COMMON = ["--batch-size", "8", "--seq-len", "64", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
          "--tokenizer", "byte", "--update-every", "5", "--lr", "3e-3", "--warmup-steps", "5", "--workers", "2"]


@pytest.fixture(scope="module")
def regrouped(sample_corpus, tmp_path_factory):
    """A regroup-style output: data/domain=<id>/part-0.parquet (domain only in the path) + domains.json."""
    out = tmp_path_factory.mktemp("regrouped")
    table = pq.read_table(sample_corpus)
    for i, name in enumerate(MODULES):
        part = out / "data" / f"domain={i}"
        part.mkdir(parents=True)
        pq.write_table(table.filter(pc.equal(table["source"], name)), part / "part-0.parquet", row_group_size=50)
    (out / "domains.json").write_text(json.dumps({"k": len(MODULES), "sizes": {str(i): 1 for i in range(4)}}))
    return out


@pytest.fixture(scope="module")
def column_corpus(sample_corpus, tmp_path_factory):
    """A plain parquet file whose `domain` column holds module names (strings)."""
    table = pq.read_table(sample_corpus)
    table = table.filter(pc.is_in(table["source"], value_set=__import__("pyarrow").array(MODULES[:3])))
    table = table.append_column("domain", table["source"])
    path = tmp_path_factory.mktemp("col") / "corpus.parquet"
    pq.write_table(table, path)
    return path


def _rnb(args: list[str]) -> None:
    assert main(["train", *args]) == 0


@pytest.fixture(scope="module")
def rnb_run(ray_session, regrouped, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "rnb"
    _rnb(["--data", str(regrouped), "--output", str(run), "--strategy", "rnb", "--steps", "40",
          "--eval-every", "10", "--checkpoint-every", "20", "--debug-dump-rounds", "1", *COMMON])
    return run


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rnb_end_to_end(rnb_run):
    cfg = json.loads((rnb_run / "config.json").read_text())
    assert cfg["strategy"] == "rnb" and cfg["workers"] == 2
    mixture = json.loads((rnb_run / "mixture.json").read_text())
    assert mixture["domains"] == ["0", "1", "2", "3"]
    traj = mixture["trajectory"]
    assert [t["round"] for t in traj] == list(range(-1, 8))
    assert traj[0]["mixture"] == [0.25] * 4
    assert max(abs(x - 0.25) for t in traj[1:] for x in t["mixture"]) > 0.01  # p moves away from uniform
    assert all(abs(sum(t["mixture"]) - 1) < 1e-9 for t in traj)
    rows = _rows(rnb_run)
    evals = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
    assert len(evals) == 4 and evals[-1] < evals[0] - 0.5  # eval loss falls
    for key in ("step", "round", "train_loss", "eval_loss_by_domain", "mixture", "tokens", "seconds_train",
                "seconds_capture", "seconds_mixer", "extra_flops", "extra_seconds", "skipped_update"):
        assert key in rows[-1]
    assert rows[-1]["step"] == 40 and rows[-1]["flops_balance"] > 0 and rows[-1]["extra_flops"] == 0
    result = json.loads((rnb_run / "result.json").read_text())
    assert result["rounds"] == 8 and result["skipped_rounds"] == 0
    assert result["final_eval_loss"] == pytest.approx(evals[-1])
    assert list(result["final_mixture"].values()) == pytest.approx(traj[-1]["mixture"])
    assert sorted(p.name for p in (rnb_run / "checkpoints").glob("checkpoint_*"))


def test_two_workers_aggregate_equals_single_process_on_the_union(rnb_run):
    """Round 0's domain-mean head gradients, reduced by the workers' collectives (reduce-scatter by columns)
    and gathered for the dump, == autograd over both workers' batches together in one process."""
    dumped = np.load(rnb_run / "debug" / "round_0000_grads.npz")
    tok = load_tokenizer(None, "byte")
    model = build_model(None, vocab_size=len(tok), seq_len=64, n_layer=1, n_head=2, n_embd=32,
                        pad_token_id=tok.pad_token_id, seed=0)
    head = find_capture_modules(model, "head")["lm_head"]
    sums, counts = torch.zeros(4, head.weight.numel(), dtype=torch.float64), np.zeros(4, dtype=np.int64)
    debug = rnb_run / "debug"
    for step in range(5):
        model.load_state_dict(torch.load(debug / f"round_0000_step_{step:06d}_model.pt"))
        parts = [np.load(debug / f"round_0000_step_{step:06d}_rank_{r}.npz") for r in (0, 1)]
        for part in parts:  # the union of both workers' batches (padding lengths may differ)
            ids, am = torch.as_tensor(part["input_ids"]), torch.as_tensor(part["attention_mask"])
            for d in range(4):
                sel = torch.as_tensor(part["domains"] == d)
                if not sel.any():
                    continue
                model.zero_grad()
                per_example_loss(model(input_ids=ids[sel], attention_mask=am[sel]).logits, ids[sel],
                                 am[sel]).sum().backward()  # sum of per-example gradients
                sums[d] += head.weight.grad.reshape(-1).double()
                counts[d] += int(sel.sum())
    assert dumped["counts"].tolist() == counts.tolist() and counts.sum() == 2 * 5 * 8
    expected = (sums / torch.as_tensor(counts)[:, None]).numpy()
    np.testing.assert_allclose(dumped["grads"], expected, rtol=1e-4, atol=1e-6)
    # and the mixer received only their Gram matrix (kilobytes), equal to the one of the union
    mixed = np.load(rnb_run / "mixer" / "round_0000.npz")
    np.testing.assert_allclose(mixed["gram"], expected @ expected.T, rtol=1e-4, atol=1e-8)
    rows = _rows(rnb_run)
    assert 0 < rows[-1]["bytes_to_mixer"] < 1024 and rows[-1]["bytes_collective"] > 0
    assert json.loads((rnb_run / "result.json").read_text())["capture"]["mode"] == "exact"


def test_two_workers_with_the_row_hash_sketch(ray_session, regrouped, tmp_path):
    """The default capture when exact sums exceed the budget (a row hash, frequent rows exact) over 2 workers:
    the exact rows fill the first worker's columns entirely, so only the second holds sketched numbers — the
    round's collectives must still agree (they once did not: gloo failed at the first round)."""
    run = tmp_path / "rh"
    _rnb(["--data", str(regrouped), "--output", str(run), "--strategy", "rnb", "--steps", "10",
          "--eval-every", "10", "--debug-dump-rounds", "1", "--capture-budget-mb", "0.05", *COMMON])
    result = json.loads((run / "result.json").read_text())
    cap = result["capture"]
    assert (cap["mode"], cap["kind"], cap["sketch_dim"]) == ("sketch", "rowhash", 64)
    assert result["rounds"] == 2 and result["skipped_rounds"] == 0
    errors = [r["sketch_gram_rel_error"] for r in _rows(run) if r.get("sketch_gram_rel_error") is not None]
    assert errors and all(0 < e < 10 for e in errors)  # the hashed part (second worker's columns) counted
    dumped = np.load(run / "debug" / "round_0000_grads.npz")
    assert dumped["grads"].shape == (4, 64 * 32)  # 64 buckets × the 32-wide input, gathered from both workers
    means = dumped["grads"][dumped["counts"] > 0]
    gram = np.load(run / "mixer" / "round_0000.npz")["gram"][np.ix_(dumped["counts"] > 0, dumped["counts"] > 0)]
    np.testing.assert_allclose(gram, means @ means.T, rtol=1e-4, atol=1e-8)


def test_resume_continues_the_same_trajectory(ray_session, regrouped, rnb_run, tmp_path):
    run = tmp_path / "half"
    _rnb(["--data", str(regrouped), "--output", str(run), "--strategy", "rnb", "--steps", "40", "--stop-after",
          "20", "--eval-every", "10", *COMMON])
    half = json.loads((run / "mixture.json").read_text())["trajectory"]
    assert half[-1]["step"] == 20
    _rnb(["--resume", str(run)])
    straight = json.loads((rnb_run / "mixture.json").read_text())["trajectory"]
    resumed = json.loads((run / "mixture.json").read_text())["trajectory"]
    assert [t["round"] for t in resumed] == [t["round"] for t in straight]
    np.testing.assert_allclose([t["mixture"] for t in resumed], [t["mixture"] for t in straight], atol=1e-5)
    a, b = _rows(rnb_run), _rows(run)
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no duplicated or missing rows
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], abs=1e-4)
    assert b[-1]["train_loss"] == pytest.approx(a[-1]["train_loss"], abs=1e-4)


def test_stratified_keeps_p_uniform_on_a_domain_column_corpus(ray_session, column_corpus, tmp_path, monkeypatch):
    run = tmp_path / "strat"
    monkeypatch.chdir(column_corpus.parent)  # a relative --data: made absolute before the workers read it
    _rnb(["--data", column_corpus.name, "--output", str(run), "--strategy", "stratified", "--steps", "10",
          "--eval-every", "10", *COMMON])
    assert json.loads((run / "config.json").read_text())["data"] == str(column_corpus)
    mixture = json.loads((run / "mixture.json").read_text())
    assert mixture["domains"] == sorted(MODULES[:3])  # string domains, lexicographic
    for t in mixture["trajectory"]:
        assert t["mixture"] == pytest.approx([1 / 3] * 3, abs=1e-12)
    rows = _rows(run)
    assert all(r["mixture"] == pytest.approx([1 / 3] * 3) for r in rows)
    assert rows[-1]["seconds_capture"] == 0.0 and rows[-1]["flops_balance"] == 0.0  # no capture for stratified


# ---------------------------------------------------------------------------------------------- bad input
def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), output=str(out), tokenizer="byte", steps=10, update_every=5, workers=1)
    base.update(kw)
    return TrainConfig(**base)


def _fails(cfg_or_fn, match: str, out: Path):
    t0 = time.perf_counter()
    with pytest.raises(RnbError, match=match):
        cfg_or_fn() if callable(cfg_or_fn) else train(cfg_or_fn)
    assert time.perf_counter() - t0 < 60  # fails at once (no waiting on Ray resources)
    assert not out.exists()  # nothing written half-way


def test_bad_inputs(ray_session, regrouped, column_corpus, sample_corpus, tmp_path):
    out = tmp_path / "never"
    _fails(_cfg(sample_corpus, out), "no domain column 'domain'", out)
    _fails(lambda: _cfg(regrouped, out, lam=0.0).validate(), "λ must be > 0", out)
    _fails(lambda: _cfg(regrouped, out, lam=-1.0).validate(), "lam", out)
    _fails(lambda: _cfg(regrouped, out, strategy="nope").validate(), "unknown", out)
    _fails(_cfg(regrouped, out, workers=64), "needs 64 CPUs but the Ray cluster has 2", out)
    _fails(_cfg(regrouped, out, model=str(tmp_path / "no-such-model")), "does not exist", out)
    _fails(_cfg(regrouped, out, strategy_options='{"eta": 1}'), "bad options for strategy rnb", out)
    weights = tmp_path / "w.json"
    for content, match in [({"0": 0.5, "1": 0.5, "2": 0.5, "3": -0.5}, "non-negative"),
                           ({"0": 0.5, "1": 0.5, "7": 0.0, "3": 0.0}, "wrong domains"),
                           ({"0": 0.3, "1": 0.3, "2": 0.3, "3": 0.3}, "sum to 1")]:
        weights.write_text(json.dumps(content))
        _fails(_cfg(regrouped, out, strategy="static", static_weights=str(weights)), match, out)
    one = tmp_path / "one.parquet"
    t = pq.read_table(column_corpus)
    pq.write_table(t.filter(pc.equal(t["domain"], "decimal")), one)
    _fails(_cfg(one, out), "at least 2", out)
    # An existing non-empty output is refused; the CLI prints the error and exits 2.
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["train", "--data", str(regrouped), "--output", str(out), "--tokenizer", "byte"]) == 2
    assert (out / "x").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["x"]
