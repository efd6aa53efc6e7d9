# One command to set up and run the main job, one to set up and run the tests (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo test lint bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/rnb run --output runs/demo

test: setup
	$(VENV)/bin/ruff check rnb_ray jobs tests benchmarks examples
	$(PY) -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check rnb_ray jobs tests benchmarks examples

bench: setup
	$(PY) benchmarks/run_all.py

bench-quick: setup
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) runs
