"""Stages that need local or shared paths refuse object-store URIs with a clear error, before Ray."""

from __future__ import annotations

import pytest

from rnb_ray.errors import RnbError
from rnb_ray.pipeline import PipelineConfig
from rnb_ray.sweep.config import SweepConfig
from rnb_ray.sweep.tune import _validate_input


@pytest.mark.parametrize("field", ["input", "output"])
def test_rnb_run_refuses_uris(field, tmp_path):
    kw = {"input": str(tmp_path), "output": str(tmp_path / "run")} | {field: "s3://bucket/corpus"}
    with pytest.raises(RnbError) as e:
        PipelineConfig(**kw).validate()
    assert "s3://bucket/corpus" in str(e.value) and "object-store" in str(e.value)
    assert f"--{field}" in str(e.value)


@pytest.mark.parametrize("field", ["input", "output"])
def test_rnb_sweep_refuses_uris(field, tmp_path):
    kw = {"input": str(tmp_path), "output": str(tmp_path / "sweep")} | {field: "gs://bucket/corpus"}
    with pytest.raises(RnbError) as e:
        _validate_input(SweepConfig(**kw))
    assert "gs://bucket/corpus" in str(e.value) and f"--{field}" in str(e.value)
