"""`rnb report` and `rnb export` on a real (small) pipeline run."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import pyarrow.parquet as pq
import pytest
from test_pipeline import pipeline_run

from rnb_ray.cli import main
from rnb_ray.errors import RnbError
from rnb_ray.export import export
from rnb_ray.outputs import domain_of_dir
from rnb_ray.report.html import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("mixture.png", "loss.png", "domain_sizes.png", "crosstab.png", "k_sweep.png")


@pytest.fixture(scope="module")
def run_dir(ray_session, sample_corpus, tmp_path_factory) -> Path:
    cfg, _ = pipeline_run(sample_corpus, tmp_path_factory)  # reuses the pipeline tests' run when it exists
    return Path(cfg.output)


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01  # not a blank canvas


def test_report_of_a_pipeline_run(run_dir, tmp_path):
    assert main(["report", str(run_dir), "--output", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    for name in FIGURES:
        _check_png(tmp_path / "rep" / name)
        assert f'href="{name}"' in page
    # Self-contained: every figure is embedded, and the embedded bytes are the PNG files.
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(FIGURES)
    assert {base64.b64decode(e) for e in embedded} == {(tmp_path / "rep" / n).read_bytes() for n in FIGURES}
    # Representative texts appear, HTML-escaped (docstrings are full of <, > and &).
    domains = json.loads((run_dir / "regroup" / "domains.json").read_text())
    reps = [t for d in domains["domains"] for t in d["representatives"]]
    assert reps
    import html

    shown = html.escape(reps[0][:60], quote=True)
    assert shown in page
    assert "<script" not in page.lower()
    best = json.loads((run_dir / "sweep" / "best.json").read_text())
    assert f"k = {best['k']}" in page
    # The mixing method's cost beyond training, from result.json, as a share of training FLOPs.
    result = json.loads((run_dir / "train" / "result.json").read_text())
    share = 100 * result["flops_balance"] / result["flops_train"]
    assert f"balance {result['flops_balance']:.3g} ({share:.3g}%)" in page


def test_report_of_a_training_run_dir(run_dir, tmp_path):
    page = write_report(run_dir / "train", tmp_path / "train-report")
    names = {p.name for p in page.parent.glob("*.png")}
    # No sweep here; sizes and cross-tab come from the regrouped corpus the run trained on.
    assert {"mixture.png", "loss.png", "domain_sizes.png", "crosstab.png"} <= names
    assert "k_sweep.png" not in names
    for n in names:
        _check_png(page.parent / n)


def test_report_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(RnbError, match="not an rnb run directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_formats_of_a_real_run(run_dir, tmp_path):
    mixture = json.loads((run_dir / "train" / "mixture.json").read_text())["final"]
    assert json.loads(export(run_dir, "json")) == mixture
    rows = list(csv.DictReader(io.StringIO(export(run_dir, "csv"))))
    sizes = json.loads((run_dir / "regroup" / "domains.json").read_text())["sizes"]
    assert {r["domain"]: int(r["documents"]) for r in rows} == {k: int(v) for k, v in sizes.items()}
    out = tmp_path / "blend.txt"
    assert main(["export", str(run_dir), "--format", "megatron", "--output", str(out)]) == 0
    total = 0
    for line in out.read_text().splitlines():
        weight, path = line.split(" ", 1)
        total += float(weight)
        assert pq.read_table(path).num_rows == sizes[domain_of_dir(Path(path).name)]
    assert abs(total - 1) < 1e-6
    # the schedule follows the trajectory; the hf form sums to 1 in domain order
    trajectory = json.loads((run_dir / "train" / "mixture.json").read_text())["trajectory"]
    schedule = json.loads(export(run_dir, "json", with_schedule=True))["schedule"]
    assert [e["step"] for e in schedule] == [t["step"] for t in trajectory]
    assert [list(e["weights"].values()) for e in schedule] == [t["mixture"] for t in trajectory]
    hf = json.loads(export(run_dir, "hf"))
    assert hf["domains"] == list(mixture) and abs(sum(hf["probabilities"]) - 1) < 1e-9
    assert all(pq.read_table(d).num_rows == sizes[n] for n, d in zip(hf["domains"], hf["data_dirs"], strict=True))
    with pytest.raises(RnbError, match="unknown export format"):
        export(run_dir, "tfrecord")
