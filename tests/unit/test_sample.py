"""The embedded sample corpus is the same whatever the calling process imported before."""

from __future__ import annotations

import inspect

import pyarrow.parquet as pq

from rnb_ray.sample import write_sample_corpus


def test_sample_corpus_ignores_patches_other_libraries_made(tmp_path, monkeypatch):
    # grpc (imported by Ray) replaces inspect.isgenerator with an undocumented wrapper; do the same here.
    original = inspect.isgenerator
    monkeypatch.setattr(inspect, "isgenerator", lambda obj: original(obj))
    table = pq.read_table(write_sample_corpus(tmp_path / "sample.parquet"))
    ids = table.column("id").to_pylist()
    assert "inspect.isgenerator" in ids  # walked as a fresh interpreter sees inspect
    assert len(ids) == len(set(ids)) and table.column_names == ["id", "text", "source"]
    again = pq.read_table(write_sample_corpus(tmp_path / "again.parquet"))
    assert again.equals(table)
