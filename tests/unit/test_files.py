"""rnb_ray.files on local paths: what a location is, sorted listing, hidden names, suffixes, hive directories.

The same functions on s3:// URIs are exercised by test_storage.py (corpus) and the object-store integration
tests (regroup, assign, training plan)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnb_ray import files
from rnb_ray.errors import RnbError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * len(name))


def test_locate_says_what_is_there(tmp_path):
    _touch(tmp_path, "d/a.parquet")
    assert files.locate(tmp_path / "d", "input").kind == "dir"
    f = files.locate(tmp_path / "d" / "a.parquet", "input")
    assert f.kind == "file" and f.size == len("d/a.parquet") and f.mtime_ns > 0 and f.fs is None
    assert files.locate(tmp_path / "nope", "input").kind == "missing"
    d = files.locate(str(tmp_path / "d") + "/", "input")
    assert d.shown == str(tmp_path / "d") and d.child("a.parquet").kind == "file"


def test_listing_is_sorted_in_path_order_and_skips_hidden_names(tmp_path):
    # Path order puts "a/b" before "a-c" (string order would not): row ids depend on this order.
    _touch(tmp_path, "a/b.parquet", "a-c.parquet", "a.parquet", "_tmp/x.parquet", ".h/x.parquet", "_x.parquet",
           "sub/_y/z.parquet", "notes.md")
    listed = files.list_files(files.locate(tmp_path, "input"))
    rel = [str(Path(f.path).relative_to(tmp_path)) for f in listed]
    assert rel == ["a/b.parquet", "a-c.parquet", "a.parquet", "notes.md"]
    assert all(f.shown == f.path and f.size > 0 for f in listed)
    only = files.list_files(files.locate(tmp_path, "input"), suffixes=(".parquet",))
    assert [Path(f.path).name for f in only] == ["b.parquet", "a-c.parquet", "a.parquet"]


def test_a_file_lists_itself_whatever_its_suffix(tmp_path):
    _touch(tmp_path, "x.txt")
    [f] = files.list_files(files.locate(tmp_path / "x.txt", "input"), suffixes=(".parquet",))
    assert f.path == str(tmp_path / "x.txt") and f.dirs == ()
    assert files.list_files(files.locate(tmp_path / "missing", "input")) == []


def test_hive_value_reads_key_value_directories_below_the_listed_root(tmp_path):
    _touch(tmp_path, "domain=1/p.parquet", "other=5/domain=3/r.parquet", "plain/q.parquet")
    listed = files.list_files(files.locate(tmp_path, "--data"))
    assert [files.hive_value(f, "domain") for f in listed] == ["1", "3", None]
    assert [files.hive_value(f, "other") for f in listed] == [None, "5", None]


def test_an_unusable_uri_is_an_rnb_error_naming_the_flag():
    with pytest.raises(RnbError, match="cannot open --input nosuch://x"):
        files.locate("nosuch://x/y", "input", flag="--input")
