"""`python jobs/X.py` puts jobs/ first on sys.path: a job script named like a standard-library module
(e.g. tokenize.py) shadows it for every job (inspect imports tokenize), so none may be."""

import sys
from pathlib import Path

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_no_job_script_shadows_a_standard_library_module():
    scripts = sorted(p.stem for p in JOBS.glob("*.py"))
    assert "train" in scripts  # the directory was found
    shadowing = [s for s in scripts if s in sys.stdlib_module_names]
    assert not shadowing, f"jobs/{shadowing[0]}.py shadows the standard library module {shadowing[0]!r}"
