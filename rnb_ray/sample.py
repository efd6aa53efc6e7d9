"""The embedded default corpus: standard-library docstrings, one document per docstring.

Needs no download and exists on every Python install. The original domain is the top-level module, so
regrouping can be compared against a known split (the cross-tab in ``domains.json``). Deterministic for a
given Python version: modules are walked in sorted order and duplicates are dropped, and
``write_sample_corpus`` walks them in a fresh interpreter, because libraries patch the standard library
when imported (grpc, which Ray imports, replaces ``inspect.isgenerator`` with an undocumented wrapper): the
same walk in a process that has imported Ray would give a different corpus.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rnb_ray import atomic

# Varied topics so clusters mean something: text, numbers, networking, files, concurrency, testing...
SAMPLE_MODULES: tuple[str, ...] = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions",
    "functools", "http", "itertools", "json", "logging", "pathlib", "random", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "threading", "typing",
    "unittest", "urllib", "xml", "zipfile", "ast", "calendar", "configparser", "concurrent", "difflib",
    "doctest", "ftplib", "heapq", "html", "inspect", "ipaddress", "mailbox", "multiprocessing", "pdb",
    "pickle", "smtplib", "textwrap", "tokenize",
)
MIN_CHARS = 40


def _docstrings(module_name: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for a module, its submodules' public classes, functions, methods."""
    out: list[tuple[str, str]] = []
    seen: set[int] = set()

    def visit(name: str, obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 2:
            return
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= MIN_CHARS:
            out.append((name, doc))
        if inspect.ismodule(obj) or inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                child = vars(obj)[attr]
                if inspect.ismodule(child):
                    continue
                if inspect.isclass(child) or inspect.isfunction(child) or inspect.isroutine(child):
                    owner = getattr(child, "__module__", "") or ""
                    if inspect.ismodule(obj) and not owner.startswith(module_name):
                        continue  # re-exported from elsewhere
                    visit(f"{name}.{attr}", child, depth + 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = importlib.import_module(module_name)
        visit(module_name, root, 0)
        for sub in sorted(getattr(root, "__all_submodules__", [])):
            visit(sub, importlib.import_module(sub), 0)
        pkg_path = getattr(root, "__path__", None)
        if pkg_path:
            import pkgutil

            for info in sorted(pkgutil.iter_modules(pkg_path), key=lambda i: i.name):
                if info.name.startswith("_") or info.name in ("test", "tests", "__main__"):
                    continue
                try:
                    visit(f"{module_name}.{info.name}", importlib.import_module(f"{module_name}.{info.name}"), 0)
                except Exception:  # platform-specific submodules (e.g. asyncio.windows_events)
                    continue
    return out


def sample_rows(modules: tuple[str, ...] = SAMPLE_MODULES) -> dict[str, list]:
    texts, domains, ids = [], [], []
    seen: set[str] = set()
    for mod in sorted(modules):
        for qualname, doc in _docstrings(mod):
            if doc in seen:
                continue
            seen.add(doc)
            texts.append(doc)
            domains.append(mod)
            ids.append(qualname)
    return {"id": ids, "text": texts, "source": domains}


def write_sample_corpus(path: str | Path, modules: tuple[str, ...] = SAMPLE_MODULES) -> Path:
    """Write the sample corpus as one parquet file (columns id, text, source) and return its path."""
    path = Path(path)
    table = pa.table(_fresh_sample_rows(modules))
    with atomic.atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _fresh_sample_rows(modules: tuple[str, ...]) -> dict[str, list]:
    """``sample_rows`` computed in a new interpreter that imports nothing but this module (see the module
    docstring: the walk must not see other libraries' patches of the standard library)."""
    code = "import json, sys; from rnb_ray.sample import sample_rows; json.dump(sample_rows(tuple(sys.argv[1:])), sys.stdout)"
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code, *modules], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)
