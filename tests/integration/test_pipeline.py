"""`rnb run`: corpus → sweep → regroup → train → report in one run directory; cached stages are reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_sweep import small_corpus, tiny_train_config

from rnb_ray.errors import RnbError
from rnb_ray.pipeline import PipelineConfig, run_pipeline

STAGES = ("sweep", "regroup", "train", "report")


def pipeline_config(sample_corpus: Path, base: Path, **overrides) -> PipelineConfig:
    settings = dict(
        output=str(base / "pipeline-run"), input=str(small_corpus(sample_corpus, base)), domain_column="source",
        k=(2, 3), trial_steps=10, sweep_eval_every=5, steps=10, eval_every=5, update_every=5,
        train_config=str(tiny_train_config(base)), cache_dir=str(base / "rnb-cache"),
    )
    settings.update(overrides)
    return PipelineConfig(**settings)


def pipeline_run(sample_corpus: Path, tmp_path_factory) -> tuple[PipelineConfig, dict]:
    """The small pipeline run shared by the pipeline and report tests (the 2nd call reuses every stage)."""
    cfg = pipeline_config(sample_corpus, tmp_path_factory.getbasetemp())
    return cfg, run_pipeline(cfg, log=lambda s: None)


@pytest.fixture(scope="module")
def first_run(ray_session, sample_corpus, tmp_path_factory):
    return pipeline_run(sample_corpus, tmp_path_factory)


def _mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")
            if p.is_file() and ".rnb-stages" not in p.parts and p.name != "pipeline.json"}


def test_every_stage_writes_its_output(first_run):
    cfg, summary = first_run
    run = Path(cfg.output)
    assert set(summary["stages"]) == set(STAGES)
    best = json.loads((run / "sweep" / "best.json").read_text())
    assert best["k"] in (2, 3)
    assert (run / "sweep" / "results.csv").is_file()
    domains = json.loads((run / "regroup" / "domains.json").read_text())
    assert domains["k"] == best["k"] and domains["crosstab"]  # original domains cross-tabulated
    mixture = json.loads((run / "train" / "mixture.json").read_text())
    assert mixture["strategy"] == "rnb" and len(mixture["final"]) == best["k"]
    assert abs(sum(mixture["final"].values()) - 1) < 1e-6
    assert (run / "report" / "report.html").is_file()
    saved = json.loads((run / "pipeline.json").read_text())
    assert saved["best"]["k"] == best["k"] and saved["seconds_total"] > 0


def test_second_run_reuses_every_stage_and_changed_settings_redo_downstream(first_run, sample_corpus,
                                                                          tmp_path_factory):
    cfg, _ = first_run
    run = Path(cfg.output)
    before = _mtimes(run)
    again = run_pipeline(cfg, log=lambda s: None)
    assert all(again["stages"][s]["skipped"] for s in STAGES)
    assert _mtimes(run) == before  # nothing rewritten

    # More final-training steps, on a copy of the run (the report tests use the original): sweep and
    # regroup stay, training and report are redone.
    copy = tmp_path_factory.mktemp("copy") / "run"
    shutil.copytree(run, copy)
    longer = pipeline_config(sample_corpus, tmp_path_factory.getbasetemp(), steps=15, output=str(copy))
    third = run_pipeline(longer, log=lambda s: None)
    assert third["stages"]["sweep"]["skipped"] and third["stages"]["regroup"]["skipped"]
    assert not third["stages"]["train"]["skipped"] and not third["stages"]["report"]["skipped"]
    rows = [json.loads(line) for line in (copy / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 15
    assert _mtimes(run) == before


def test_bad_pipeline_settings(tmp_path):
    with pytest.raises(RnbError, match="does not exist"):
        run_pipeline(PipelineConfig(output=str(tmp_path / "r"), input=str(tmp_path / "missing.parquet")))
    with pytest.raises(RnbError, match="trial_steps must be positive"):
        run_pipeline(PipelineConfig(output=str(tmp_path / "r"), trial_steps=0))
    with pytest.raises(RnbError, match="k list is empty"):
        run_pipeline(PipelineConfig(output=str(tmp_path / "r"), k=()))
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "precious.txt").write_text("x")
    with pytest.raises(RnbError, match="not an rnb run"):
        run_pipeline(PipelineConfig(output=str(tmp_path / "notrun")))


def test_stage_hash_is_relocatable_and_sensitive(tmp_path):
    from rnb_ray.pipeline import portable, settings_hash

    a, b = tmp_path / "a", tmp_path / "b"
    sa = portable({"data": str(a / "regroup"), "steps": 10, "other": "/elsewhere"}, a)
    sb = portable({"data": str(b / "regroup"), "steps": 10, "other": "/elsewhere"}, b)
    assert sa == sb == {"data": "RUN/regroup", "steps": 10, "other": "/elsewhere"}
    assert settings_hash(sa, ["x"]) == settings_hash(sb, ["x"])
    assert settings_hash(sa, ["x"]) != settings_hash({**sa, "steps": 11}, ["x"])
    assert settings_hash(sa, ["x"]) != settings_hash(sa, ["y"])  # upstream changes propagate


def test_tokenize_stage_trains_on_packed_shards(first_run, sample_corpus, tmp_path_factory):
    """`rnb run --tokenize` on a copy of the run: sweep and regroup are reused, the tokens stage writes token
    shards with the training tokenizer, and the final training packs from them (no padding)."""
    cfg, _ = first_run
    copy = tmp_path_factory.mktemp("tokcopy") / "run"
    shutil.copytree(Path(cfg.output), copy)
    tok_cfg = pipeline_config(sample_corpus, tmp_path_factory.getbasetemp(), output=str(copy), tokenize=True,
                              tokenize_workers=1)
    summary = run_pipeline(tok_cfg, log=lambda s: None)
    assert summary["stages"]["sweep"]["skipped"] and summary["stages"]["regroup"]["skipped"]
    assert not summary["stages"]["tokens"]["skipped"] and not summary["stages"]["train"]["skipped"]
    manifest = json.loads((copy / "tokens" / "tokens.json").read_text())
    from rnb_ray.balance.lm import tokenizer_source

    assert manifest["tokenizer"]["name"] == tokenizer_source(None, None)  # the training default (BERT: SEP ends docs)
    assert json.loads((copy / "train" / "config.json").read_text())["data"] == str(copy / "tokens")
    rows = [json.loads(line) for line in (copy / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == rows[-1]["tokens_processed"]  # packed: no padding
