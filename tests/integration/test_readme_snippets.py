"""The README's "R&B in your own training loop" snippets run as written, and so do the API's docstring
examples (real torch, a real tiny GPT-2 and the real Hugging Face Trainer)."""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippet(name: str) -> str:
    m = re.search(rf"<!-- readme-test: {name} -->\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert m, f"README snippet {name!r} not found"
    return m.group(1)


def test_api_docstring_examples():
    import rnb_ray.api

    result = doctest.testmod(rnb_ray.api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 20 and result.failed == 0


def test_readme_loop_snippet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet("loop"), "README:loop", "exec"), {})
    assert capsys.readouterr().out.strip().endswith(" 4")  # 20 steps, a round every 5


def test_readme_hf_snippet(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_snippet("hf"), "README:hf", "exec"), scope)
    traj = json.loads((tmp_path / "hf-out" / "rnb" / "mixture.json").read_text())["trajectory"]
    assert [t["step"] for t in traj] == [0, 2, 4, 6]
    assert list(scope["train"].p) == traj[-1]["mixture"]
