"""Atomic outputs: write beside the target, then rename into place (no Ray, no project imports).

Every file or directory rnb-ray writes for a user goes through here, so a failed or interrupted run never
leaves a half-written output: readers see the old content or the new one, never a mix.

* :func:`atomic_file` — a temporary path beside ``path``; renamed onto it when the block succeeds (for
  writers that take a path: ``torch.save``, ``pq.write_table``, ``fig.savefig``).
* :func:`write_bytes`, :func:`write_text`, :func:`write_json` — the one-call forms.
* :func:`atomic_dir` — a temporary directory beside ``path``; renamed onto it when the block succeeds.

Temporary names start with ``.<name>.tmp-`` so listings and globs of the real outputs never see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal


def _beside(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, *, default: Any = str) -> None:
    """``data`` as indented JSON plus a newline (values JSON cannot hold go through ``default``)."""
    write_text(path, json.dumps(data, indent=2, default=default) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, if_exists: Literal["replace", "keep"] = "replace",
               mode: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; move it onto ``path`` when the block succeeds.

    ``if_exists``: what happens when ``path`` exists by then — ``"replace"`` swaps it out (the old one is
    moved aside first and deleted after the rename), ``"keep"`` keeps it and discards ours (a cache entry
    another process filled first). ``mode`` sets the directory's permissions (default: the umask's).
    A failed or interrupted block leaves ``path`` as it was and removes the temporary directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    tmp.mkdir()
    if mode is not None:
        os.chmod(tmp, mode)
    try:
        yield tmp
        if path.exists():
            if if_exists == "keep":
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = _beside(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if if_exists != "keep" or not path.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else filled it between our check and rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
