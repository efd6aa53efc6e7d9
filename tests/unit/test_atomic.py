"""rnb_ray.atomic: outputs appear whole or not at all."""

from __future__ import annotations

import json

import pytest

from rnb_ray import atomic


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_json_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert _siblings(target) == ["out.json"]


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.bin"
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic.atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _siblings(target) == ["x.bin"]


def test_atomic_dir_replace_and_failure(tmp_path):
    target = tmp_path / "d"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(ValueError), atomic.atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
        raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert _siblings(target) == ["d"]


def test_atomic_dir_keep_discards_ours_when_filled_first(tmp_path):
    target = tmp_path / "entry"
    with atomic.atomic_dir(target, if_exists="keep") as tmp:
        (tmp / "ours").write_text("x")
        target.mkdir()  # another process filled the entry meanwhile
        (target / "theirs").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert _siblings(target) == ["entry"]


def test_atomic_dir_mode(tmp_path):
    target = tmp_path / "shared"
    with atomic.atomic_dir(target, mode=0o755):
        pass
    assert target.stat().st_mode & 0o777 == 0o755
