"""Shared fixtures: one real local Ray session for the whole test run, small real corpora."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs, like CI), shared by every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    """The embedded default corpus (stdlib docstrings) as a real parquet file."""
    from rnb_ray.sample import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("sample") / "sample.parquet")
