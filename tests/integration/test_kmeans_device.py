"""``--kmeans-device cuda`` on a Ray cluster without a GPU: `rnb sweep` and `rnb run` refuse at once.

(`rnb regroup`'s refusal is in test_regroup.py; the setting itself in tests/unit/test_kmeans_torch.py.)
"""

from __future__ import annotations

import pytest

from rnb_ray.errors import RnbError
from rnb_ray.pipeline import PipelineConfig, run_pipeline
from rnb_ray.sweep.config import SweepConfig
from rnb_ray.sweep.tune import run_sweep

pytestmark = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")


def test_sweep_with_kmeans_on_cuda_fails_before_embedding(ray_session, sample_corpus, tmp_path):
    cfg = SweepConfig(input=str(sample_corpus), output=str(tmp_path / "sweep"), k=(2, 3),
                      cache_dir=str(tmp_path / "cache"), kmeans_device="cuda")
    with pytest.raises(RnbError, match="needs 1 GPUs but the Ray cluster has 0") as e:
        run_sweep(cfg, log=lambda s: None)
    assert "--kmeans-device cpu" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "sweep" / "trials").exists()


def test_pipeline_with_kmeans_on_cuda_fails_before_any_stage(ray_session, sample_corpus, tmp_path):
    cfg = PipelineConfig(output=str(tmp_path / "run"), input=str(sample_corpus), kmeans_device="cuda")
    with pytest.raises(RnbError, match="--kmeans-device cuda"):
        run_pipeline(cfg, log=lambda s: None)
    assert not (tmp_path / "run" / "sweep").exists() and not (tmp_path / "run" / ".rnb-cache").exists()
