"""`rnb export`: the final mixture as JSON, CSV and a Megatron-style blend list."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnb_ray.cli import main
from rnb_ray.errors import RnbError
from rnb_ray.export import export
from rnb_ray.outputs import domain_dir

TRAJECTORY = [{"round": -1, "step": 0, "mixture": [0.2, 0.3, 0.5], "skipped": None},
              {"round": 0, "step": 4, "mixture": [0.4, 0.3, 0.3], "skipped": None},
              {"round": 1, "step": 8, "mixture": [0.5, 0.2, 0.3], "skipped": None}]


def _run_dir(tmp_path: Path, *, pipeline: bool = True, legacy: bool = False, rows: int = 1,
             trajectory: list | None = None) -> Path:
    """A run directory in the documented layout (ARCHITECTURE.md), with real parquet domain dirs."""
    root = tmp_path / "run"
    regroup = root / "regroup" if pipeline else tmp_path / "regrouped"
    train = root / "train" if pipeline else root
    for d, n in (("0", 3), ("1", 2), ("2", 5)):
        part = regroup / "data" / (f"domain={d}" if legacy else domain_dir(d))
        part.mkdir(parents=True)
        pq.write_table(pa.table({"text": [f"doc {d}-{i}" for i in range(n * rows)], "domain": [int(d)] * (n * rows)}),
                       part / "part-0.parquet")
    (regroup / "domains.json").write_text(json.dumps({"k": 3, "sizes": {"0": 3, "1": 2, "2": 5}}))
    train.mkdir(parents=True, exist_ok=True)
    (train / "config.json").write_text(json.dumps({"data": str(regroup)}))
    (train / "mixture.json").write_text(json.dumps({
        "strategy": "rnb", "domains": ["0", "1", "2"], "final": {"0": 0.5, "1": 0.2, "2": 0.3},
        "trajectory": trajectory or [], "lam": 3.0,
    }))
    if pipeline:
        (root / "pipeline.json").write_text("{}")
    return root


@pytest.mark.parametrize("pipeline,legacy", [(True, False), (False, False), (True, True)])
def test_json_csv_megatron(tmp_path, pipeline, legacy):
    """``legacy``: a regroup written before the layout changed (hive-style ``domain=<id>`` directories)."""
    run = _run_dir(tmp_path, pipeline=pipeline, legacy=legacy)
    mix = json.loads(export(run, "json"))
    assert mix == {"0": 0.5, "1": 0.2, "2": 0.3}
    assert list(mix) == ["0", "1", "2"]

    rows = list(csv.DictReader(io.StringIO(export(run, "csv"))))
    assert [r["domain"] for r in rows] == ["0", "1", "2"]
    assert [float(r["weight"]) for r in rows] == [0.5, 0.2, 0.3]
    assert [r["documents"] for r in rows] == ["3", "2", "5"]
    assert all(Path(r["path"]).is_dir() for r in rows)

    lines = export(run, "megatron").splitlines()
    assert len(lines) == 3
    weights, paths = zip(*(line.split(" ", 1) for line in lines), strict=True)
    assert [float(w) for w in weights] == [0.5, 0.2, 0.3]
    for name, p in zip(("0", "1", "2"), paths, strict=True):
        assert Path(p).is_absolute() and Path(p).name == (f"domain={name}" if legacy else domain_dir(name))
        assert pq.read_table(p).num_rows > 0  # the path is a readable parquet directory


def test_output_file_is_written(tmp_path):
    run = _run_dir(tmp_path)
    out = tmp_path / "out" / "mixture.json"
    assert main(["export", str(run), "--format", "json", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"0": 0.5, "1": 0.2, "2": 0.3}
    assert not list(out.parent.glob("*.tmp"))


def test_unknown_format_and_not_a_run(tmp_path, capsys):
    run = _run_dir(tmp_path)
    with pytest.raises(RnbError, match="unknown export format 'yaml'.*json, csv, megatron, hf"):
        export(run, "yaml")
    with pytest.raises(RnbError, match="not an rnb run directory"):
        export(tmp_path / "run" / "regroup", "json")
    with pytest.raises(RnbError, match="does not exist"):
        export(tmp_path / "nope", "json")
    # Through the CLI: exit code 2, message without traceback.
    assert main(["export", str(tmp_path), "--format", "json"]) == 2
    err = capsys.readouterr().err
    assert "not an rnb run directory" in err and "Traceback" not in err


def test_megatron_needs_the_domain_directories(tmp_path):
    run = _run_dir(tmp_path)
    import shutil

    shutil.rmtree(run / "regroup" / "data" / domain_dir(1))
    with pytest.raises(RnbError, match="no parquet directory found for domain"):
        export(run, "megatron")
    assert json.loads(export(run, "json"))["1"] == 0.2  # the other formats still work


def test_schedule_json_and_csv_follow_the_trajectory(tmp_path):
    run = _run_dir(tmp_path, trajectory=TRAJECTORY)
    doc = json.loads(export(run, "json", with_schedule=True))
    assert doc["domains"] == ["0", "1", "2"]
    assert [e["step"] for e in doc["schedule"]] == [0, 4, 8]
    assert [list(e["weights"].values()) for e in doc["schedule"]] == [t["mixture"] for t in TRAJECTORY]
    rows = list(csv.DictReader(io.StringIO(export(run, "csv", with_schedule=True))))
    assert [int(r["step"]) for r in rows] == [0, 4, 8] and [int(r["round"]) for r in rows] == [-1, 0, 1]
    assert [float(rows[1][d]) for d in ("0", "1", "2")] == [0.4, 0.3, 0.3]
    out = tmp_path / "schedule.json"
    assert main(["export", str(run), "--schedule", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == doc


def test_schedule_of_an_unfinished_run_comes_from_metrics(tmp_path):
    """No mixture.json yet: the schedule is read from metrics.jsonl (an entry whenever p changed)."""
    run = _run_dir(tmp_path, pipeline=False)
    (run / "mixture.json").unlink()
    rows = [{"step": s, "round": r, "mixture": m} for s, r, m in
            ((2, 0, [0.2, 0.3, 0.5]), (4, 1, [0.2, 0.3, 0.5]), (6, 2, [0.1, 0.1, 0.8]))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = json.loads(export(run, "json", with_schedule=True))
    assert [e["step"] for e in doc["schedule"]] == [2, 6]
    assert doc["schedule"][1]["weights"] == {"0": 0.1, "1": 0.1, "2": 0.8}


def test_schedule_bad_input_is_one_clear_error(tmp_path, capsys):
    run = _run_dir(tmp_path)  # mixture.json with an empty trajectory, no metrics.jsonl
    with pytest.raises(RnbError, match="has no mixture trajectory"):
        export(run, "json", with_schedule=True)
    with pytest.raises(RnbError, match="Megatron blend is one static mixture"):
        export(run, "megatron", with_schedule=True)
    assert main(["export", str(run), "--schedule"]) == 2
    err = capsys.readouterr().err
    assert "no mixture trajectory" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_hf_export_feeds_interleave_datasets(tmp_path):
    """`--format hf` gives what datasets.interleave_datasets takes; the interleaved rows follow p."""
    import datasets

    run = _run_dir(tmp_path, rows=200, trajectory=TRAJECTORY)
    spec = json.loads(export(run, "hf"))
    assert spec["domains"] == ["0", "1", "2"] and spec["probabilities"] == pytest.approx([0.5, 0.2, 0.3])
    assert sum(spec["probabilities"]) == pytest.approx(1.0, abs=1e-12)
    parts = [datasets.load_dataset("parquet", data_files=f, split="train", cache_dir=str(tmp_path / "hf"))
             for f in spec["data_files"]]
    assert [len(p) for p in parts] == [600, 400, 1000]
    mixed = datasets.interleave_datasets(parts, probabilities=spec["probabilities"], seed=0,
                                         stopping_strategy="first_exhausted")
    head = mixed.select(range(300))["domain"]
    shares = [head.count(d) / len(head) for d in (0, 1, 2)]
    assert shares == pytest.approx(spec["probabilities"], abs=0.08)
    with_schedule = json.loads(export(run, "hf", with_schedule=True))
    assert [e["step"] for e in with_schedule["schedule"]] == [0, 4, 8]
    assert with_schedule["schedule"][0]["probabilities"] == pytest.approx([0.2, 0.3, 0.5])
