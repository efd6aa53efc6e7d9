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


def _run_dir(tmp_path: Path, *, pipeline: bool = True) -> Path:
    """A run directory in the documented layout (ARCHITECTURE.md), with real parquet domain dirs."""
    root = tmp_path / "run"
    regroup = root / "regroup" if pipeline else tmp_path / "regrouped"
    train = root / "train" if pipeline else root
    for d, n in (("0", 3), ("1", 2), ("2", 5)):
        part = regroup / "data" / f"domain={d}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"text": [f"doc {d}-{i}" for i in range(n)]}), part / "part-0.parquet")
    (regroup / "domains.json").write_text(json.dumps({"k": 3, "sizes": {"0": 3, "1": 2, "2": 5}}))
    train.mkdir(parents=True, exist_ok=True)
    (train / "config.json").write_text(json.dumps({"data": str(regroup)}))
    (train / "mixture.json").write_text(json.dumps({
        "strategy": "rnb", "domains": ["0", "1", "2"], "final": {"0": 0.5, "1": 0.2, "2": 0.3},
        "trajectory": [], "lam": 3.0,
    }))
    if pipeline:
        (root / "pipeline.json").write_text("{}")
    return root


@pytest.mark.parametrize("pipeline", [True, False])
def test_json_csv_megatron(tmp_path, pipeline):
    run = _run_dir(tmp_path, pipeline=pipeline)
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
        assert Path(p).is_absolute() and Path(p).name == f"domain={name}"
        assert pq.read_table(p).num_rows > 0  # the path is a readable parquet directory


def test_output_file_is_written(tmp_path):
    run = _run_dir(tmp_path)
    out = tmp_path / "out" / "mixture.json"
    assert main(["export", str(run), "--format", "json", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"0": 0.5, "1": 0.2, "2": 0.3}
    assert not list(out.parent.glob("*.tmp"))


def test_unknown_format_and_not_a_run(tmp_path, capsys):
    run = _run_dir(tmp_path)
    with pytest.raises(RnbError, match="unknown export format 'yaml'.*json, csv, megatron"):
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

    shutil.rmtree(run / "regroup" / "data" / "domain=1")
    with pytest.raises(RnbError, match="no parquet directory found for domain"):
        export(run, "megatron")
    assert json.loads(export(run, "json"))["1"] == 0.2  # the other formats still work
