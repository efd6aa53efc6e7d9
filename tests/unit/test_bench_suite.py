"""benchmarks/run_all.py: the README block it rewrites, and the table rows it reads from result files;
benchmarks/fidelity.py: the paired-wins and summary arithmetic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


run_all = _load("run_all")
fidelity = _load("fidelity")


def test_update_readme_rewrites_only_the_marker_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run_all.START}\nold table\n{run_all.END}\nfooter\n")
    assert run_all.update_readme("| new |", readme)
    assert readme.read_text() == f"intro\n{run_all.START}\n| new |\n{run_all.END}\nfooter\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not run_all.update_readme("| new |", plain)
    assert plain.read_text() == "no markers\n"


def test_rows_from_table_and_ratios():
    rows = run_all.rows_from({"table": [{"metric": "docs/s", "value": 120.0, "baseline": 60.0, "ratio": 2.0}]})
    assert rows == [["docs/s", "120", "60", "2", ""]]
    assert run_all.rows_from({"ratios": {"actors=2 vs 1": 1.8}}) == [["actors=2 vs 1", "", "", "1.8", ""]]
    assert run_all.rows_from({"something": 1}) == []
    nested = {"a": {"speed_ratio": 1.5, "n": 3}, "ratio_total": 2, "flag_ratio": True}
    assert run_all.rows_from(nested) == [["a.speed_ratio", "", "", "1.5", ""], ["ratio_total", "", "", "2", ""]]


def test_fidelity_wins_are_paired_by_seed_and_summary_is_mean_std():
    runs = [
        {"arm": "a", "seed": 0, "ok": True, "heldout_uniform": 1.0},
        {"arm": "a", "seed": 1, "ok": True, "heldout_uniform": 3.0},
        {"arm": "a", "seed": 2, "ok": False},
        {"arm": "b", "seed": 0, "ok": True, "heldout_uniform": 2.0},
        {"arm": "b", "seed": 1, "ok": True, "heldout_uniform": 2.0},
        {"arm": "b", "seed": 2, "ok": True, "heldout_uniform": 9.0},
    ]
    w = fidelity.wins(runs, "a", "b")
    assert (w["wins"], w["seeds"], w["mean_diff"]) == (1, 2, 0.0)
    for r in runs:
        r.update(heldout_worst=r.get("heldout_uniform"), overhead_share=0.0, overhead_seconds=0.0,
                 extra_flops_share=0.0, seconds_total=1.0)
    (sa,) = fidelity.summarize(runs, ["a"])
    assert (sa["n"], sa["failed"], sa["heldout_mean"]) == (2, 1, 2.0)
    assert abs(sa["heldout_std"] - 2 ** 0.5) < 1e-12
