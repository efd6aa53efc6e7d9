"""The streaming data plan (real parquet/jsonl files, no Ray): metadata-only planning, the hash split, each
worker's share, evaluation rows, path resolution and the bad inputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.plan import SourceReader, prepare_plan, worker_eval_set, worker_streams
from rnb_ray.balance.split import is_heldout, source_key
from rnb_ray.errors import RnbError


def _texts(d, n, start=0):
    return [f"domain {d} document {i} " + "x" * (i % 7) for i in range(start, start + n)]


def _regrouped(root: Path, sizes: list[int], row_group: int = 50) -> Path:
    """A regroup-style output: data/domain=<d>/part-0.parquet (column and directory) + domains.json."""
    for d, n in enumerate(sizes):
        part = root / "data" / f"domain={d}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"text": _texts(d, n), "domain": pa.array([d] * n, pa.int64())}),
                       part / "part-0.parquet", row_group_size=row_group)
    (root / "domains.json").write_text(json.dumps({"k": len(sizes), "sizes": {str(d): n for d, n in enumerate(sizes)}}))
    return root


def _mixed(path: Path, n: int, m: int = 3, row_group: int = 40) -> Path:
    """One file, domains interleaved (every row group holds several domains), a few null domains."""
    dom = [None if i % 97 == 5 else f"s{i % m}" for i in range(n)]
    pq.write_table(pa.table({"text": [f"row {i} of {d}" for i, d in enumerate(dom)], "domain": dom}), path,
                   row_group_size=row_group)
    return path


def _epoch(stream, n):
    return [stream.next() for _ in range(n)]


def test_a_regrouped_corpus_is_planned_from_footers_and_the_plan_does_not_grow_with_documents(tmp_path):
    small = prepare_plan(TrainConfig(data=str(_regrouped(tmp_path / "a", [300, 200, 100], row_group=100)),
                                     output="x", eval_max_per_domain=8))
    big = prepare_plan(TrainConfig(data=str(_regrouped(tmp_path / "b", [3000, 2000, 1000], row_group=1000)),
                                   output="x", eval_max_per_domain=8))
    assert big.domain_counts_from == {"parquet statistics": 6}  # no data read on the driver
    assert big.sizes.sum() + big.eval_sizes.sum() == 6000 and big.q.sum() == pytest.approx(1)
    # ten times the documents, the same files and row groups: the same plan size (eval rows are capped)
    assert len(pickle.dumps(big)) <= len(pickle.dumps(small)) * 1.1
    # the split is the per-document hash of (path relative to the data root, row within the file)
    key = source_key("data/domain=1/part-0.parquet")
    assert big.eval_sizes[1] == is_heldout(key, np.arange(2000), 0, 0.1).sum()


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_workers_stream_every_training_row_once_per_epoch_and_never_a_heldout_one(tmp_path, world):
    # 6, 4 and 2 row groups: with more workers than a domain's units, rows are strided across workers
    plan = prepare_plan(TrainConfig(data=str(_regrouped(tmp_path, [120, 80, 30], row_group=20)), output="x"))
    for d, name in enumerate(plan.domains):
        key = source_key(f"data/domain={name}/part-0.parquet")
        n = [120, 80, 30][d]
        train = {t for t, h in zip(_texts(d, n), is_heldout(key, np.arange(n), 0, 0.1), strict=True) if not h}
        got = []
        for r in range(world):
            stream = worker_streams(plan, r, world, 0, SourceReader(plan, batch_rows=7), buffer=9)[d]
            got += _epoch(stream, sum(1 for _ in _rows(stream)))  # one epoch of this worker's share
        assert sorted(got) == sorted(train)  # a partition of the training rows
        evals = [t for r in range(world) for t in worker_eval_set(plan, r, world, SourceReader(plan))[d]]
        assert evals and len(evals) == len(set(evals)) and not set(evals) & train  # held out, no overlap


def _rows(stream):
    """Every example of a stream's epoch, straight from its loader (no shuffling)."""
    for unit in stream.units:
        for _, texts in stream.loader(unit, 0):
            yield from texts


def test_a_mixed_corpus_is_scanned_once_and_streams_filter_by_domain(tmp_path):
    path = _mixed(tmp_path / "mixed.parquet", 600)
    plan = prepare_plan(TrainConfig(data=str(path), output="x", eval_max_per_domain=10))
    assert plan.domains == ["s0", "s1", "s2"] and plan.domain_counts_from == {"domain column scan": 15}
    assert any("no domain value" in w for w in plan.warnings)
    held = is_heldout(source_key("mixed.parquet"), np.arange(600), 0, 0.1)
    for d, name in enumerate(plan.domains):
        rows = [i for i in range(600) if i % 97 != 5 and f"s{i % 3}" == name]
        assert plan.sizes[d] == sum(not held[i] for i in rows) and plan.eval_sizes[d] == sum(held[i] for i in rows)
        stream = worker_streams(plan, 0, 1, 0, SourceReader(plan), buffer=16)[d]
        epoch = _epoch(stream, int(plan.sizes[d]))
        assert sorted(epoch) == sorted(f"row {i} of {name}" for i in rows if not held[i])
        evals = worker_eval_set(plan, 0, 1, SourceReader(plan))[d]
        assert len(evals) == 10 and all(t.endswith(name) and held[int(t.split()[1])] for t in evals)


def test_eval_data_means_no_split_and_its_proportions(tmp_path):
    data = _regrouped(tmp_path / "train", [50, 50, 50])
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"text": f"e{i}", "domain": i % 2}) + "\n" for i in range(30)))
    plan = prepare_plan(TrainConfig(data=str(data), eval_data=str(ev), output="x", eval_max_per_domain=4))
    assert plan.sizes.tolist() == [50, 50, 50] and plan.eval_sizes.tolist() == [15, 15, 0]
    assert plan.q.tolist() == [0.5, 0.5, 0.0] and plan.q_source == "eval_data"
    per_worker = [worker_eval_set(plan, r, 2, SourceReader(plan)) for r in range(2)]
    assert [len(a) + len(b) for a, b in zip(*per_worker, strict=True)] == [4, 4, 0]  # the cap, split by worker


def test_validate_makes_local_paths_absolute(tmp_path, monkeypatch):
    _regrouped(tmp_path / "corpus", [20, 20])
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data="corpus", output="run").validate()
    assert cfg.data == str(tmp_path / "corpus") and Path(cfg.data).is_absolute()
    assert TrainConfig(data="s3://bucket/x", output="run").resolved().data == "s3://bucket/x"


def test_bad_inputs_name_the_file(tmp_path):
    root = tmp_path / "parts"
    root.mkdir()
    pq.write_table(pa.table({"text": _texts(0, 20), "domain": [0] * 20}), root / "a.parquet")
    pq.write_table(pa.table({"text": _texts(1, 20)}), root / "b.parquet")  # no domain column
    with pytest.raises(RnbError, match=r"b\.parquet has no domain column 'domain'"):
        prepare_plan(TrainConfig(data=str(root), output="x"))
    good = root / "b.parquet"
    pq.write_table(pa.table({"text": _texts(1, 20), "domain": [1] * 20}), good)
    (root / "c.parquet").write_bytes((root / "a.parquet").read_bytes()[:-30])  # truncated
    with pytest.raises(RnbError, match=r"cannot read parquet file .*c\.parquet"):
        prepare_plan(TrainConfig(data=str(root), output="x"))
    (root / "c.parquet").unlink()
    # a domain listed in domains.json with no rows: warned and dropped; fewer than 2 left: refused
    reg = _regrouped(tmp_path / "reg", [40, 40])
    (reg / "domains.json").write_text(json.dumps({"k": 3, "sizes": {"0": 40, "1": 40, "2": 0}}))
    plan = prepare_plan(TrainConfig(data=str(reg), output="x"))
    assert plan.domains == ["0", "1"] and any("2 have no training examples" in w for w in plan.warnings)
    for f in (reg / "data" / "domain=1").iterdir():
        f.unlink()
    with pytest.raises(RnbError, match="1 domain"):
        prepare_plan(TrainConfig(data=str(reg), output="x"))
