"""Where a stage writes its output: a local directory or an object-store prefix, checked before any work
and written atomically.

* :func:`check_output_dir` — may we write there: absent, empty, or ``overwrite`` (a URI: its bucket exists too).
* :func:`domain_dir` / :func:`domain_of_dir` — the name of a domain's directory in a regroup/assign output
  (``data/domain-<id>/``; the column ``domain`` is in every file, so the name is not hive ``key=value``).
* :func:`atomic_output` — yield an :class:`OutputDir` beside the output; put it in place only if the block
  succeeds. Local: a temporary directory renamed into place (:func:`rnb_ray.atomic.atomic_dir`). Object store:
  a temporary prefix ``.<name>.tmp-*`` copied into place object by object with a marker file last
  (:func:`atomic_output_prefix`), then deleted. Either way a failure leaves nothing at the output.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from rnb_ray import atomic, storage
from rnb_ray.errors import RnbError

DOMAIN_DIR_PREFIX = "domain-"
LEGACY_DOMAIN_DIR_PREFIX = "domain="  # outputs written before the layout changed (still read)


def domain_dir(domain: int | str) -> str:
    """The directory of one domain in ``OUT/data`` of ``rnb regroup`` / ``rnb assign``: ``domain-<id>``.

    Not hive-style ``domain=<id>``: the ``domain`` column (int64) is in every file, and a hive name would make
    pandas / pyarrow infer a second, int32 or dictionary ``domain`` from the path and refuse to merge the two.
    With this name pandas, polars, DuckDB, Hugging Face ``datasets``, pyarrow and Ray Data all read one
    int64 ``domain`` column (hive partitioning on or off).
    """
    return f"{DOMAIN_DIR_PREFIX}{domain}"


def domain_of_dir(name: str) -> str | None:
    """The domain id of a directory name: ``domain-<id>``, or the older ``domain=<id>``; None for others."""
    for prefix in (DOMAIN_DIR_PREFIX, LEGACY_DOMAIN_DIR_PREFIX):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    return None


class OutputDir:
    """Where a stage writes its output: a local directory (plain ``os``) or a prefix in a filesystem."""

    def __init__(self, fs: pafs.FileSystem | None, path: str):
        self.fs = fs  # None: local, written with os/Path as before
        self.path = path

    @property
    def local(self) -> Path:
        assert self.fs is None
        return Path(self.path)

    def child(self, name: str) -> str:
        return os.path.join(self.path, name) if self.fs is None else f"{self.path}/{name}"

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.fs is None:
            Path(self.child(name)).write_bytes(data)
        else:
            storage.write_bytes(self.fs, self.child(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def save_npy(self, name: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array)
        self.write_bytes(name, buf.getvalue())


def ensure_dir(fs: pafs.FileSystem | None, path: str) -> None:
    """``mkdir -p`` locally; nothing on an object store (prefixes need no creation)."""
    if fs is None:
        os.makedirs(path, exist_ok=True)


def check_output_dir(output: str | Path, overwrite: bool) -> Path:
    """An output path we may write: absent, an empty directory, or anything with ``overwrite``.

    For an object-store URI: its bucket exists, and nothing is under the prefix (or ``overwrite``); the
    URI is returned unchanged (as a str).
    """
    if storage.is_uri(output):
        check_output_prefix(str(output), overwrite)
        return output  # type: ignore[return-value]
    out = Path(output).expanduser()
    if out.exists():
        if not out.is_dir():
            raise RnbError(f"output path {out} exists and is not a directory", where=str(out),
                           fix="choose another --output")
        if any(out.iterdir()) and not overwrite:
            raise RnbError(f"output directory {out} exists and is not empty", where=str(out),
                           fix="choose another --output, or pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; move it into place only if the block succeeds.

    A failed or interrupted run leaves nothing at ``output`` (and removes its temporary directory).
    """
    out = check_output_dir(output, overwrite).absolute()
    with atomic.atomic_dir(out) as tmp:
        yield tmp
        check_output_dir(out, overwrite)  # someone may have written there meanwhile


@contextlib.contextmanager
def atomic_output(output: str | Path, overwrite: bool, marker: str) -> Iterator[OutputDir]:
    """:func:`atomic_output_dir` for a local path or an object-store URI.

    Local: a temporary directory beside ``output``, renamed into place (``OutputDir.fs`` is None). URI: a
    temporary prefix ``.<name>.tmp-*`` beside it, copied into place with ``marker`` last, then deleted
    (see :func:`atomic_output_prefix`). Either way a failure leaves nothing at ``output``.
    """
    if storage.is_uri(output):
        with atomic_output_prefix(str(output), overwrite, marker) as (fs, tmp):
            yield OutputDir(fs, tmp)
    else:
        with atomic_output_dir(output, overwrite) as tmp:
            yield OutputDir(None, str(tmp))


# --------------------------------------------------------------------------------------------------
# Object-store prefixes: written under a temporary prefix, copied into place at the end.


def check_output_prefix(uri: str, overwrite: bool, what: str = "output") -> tuple[pafs.FileSystem, str]:
    """An output URI we may write: its bucket exists, and nothing is there (or ``overwrite``)."""
    fs, path = storage.resolve(uri, what)
    storage.require_bucket(fs, path, uri, what)
    fi = storage.info(fs, path, uri, what)
    shown = storage.strip_query(uri)
    if fi.type == pafs.FileType.File:
        raise RnbError(f"{what} {shown} exists and is an object, not a prefix", where=shown,
                       fix="choose another --output")
    if fi.type == pafs.FileType.Directory and storage.list_files(fs, path) and not overwrite:
        raise RnbError(f"{what} {shown} exists and is not empty", where=shown,
                       fix="choose another --output, or pass --overwrite to replace it")
    return fs, path


def _delete_prefix(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


@contextlib.contextmanager
def atomic_output_prefix(uri: str, overwrite: bool, marker: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """Yield ``(fs, temporary prefix)`` beside ``uri``; copy it into place if the block succeeds.

    Object stores have no rename: the finished temporary prefix is copied object by object (server-side)
    to ``uri`` with ``marker`` (e.g. ``domains.json``) copied last, then deleted. This is not atomic, but a
    reader that sees ``marker`` sees a complete output; with ``overwrite`` the old marker is deleted first.
    On failure the temporary prefix (and anything already copied) is deleted, and ``uri`` holds nothing.
    """
    fs, out = check_output_prefix(uri, overwrite)
    parent, _, name = out.rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    copied = False
    try:
        yield fs, tmp
        check_output_prefix(uri, overwrite)  # someone may have written there meanwhile
        files = [i.path for i in storage.list_files(fs, tmp)]
        marker_path = f"{tmp}/{marker}"
        if marker_path not in files:
            raise RuntimeError(f"output under {tmp} lacks its marker file {marker}")
        if overwrite:
            with contextlib.suppress(OSError):
                fs.delete_file(f"{out}/{marker}")
            _delete_prefix(fs, out)
        copied = True
        for src in [f for f in files if f != marker_path] + [marker_path]:
            fs.copy_file(src, out + src[len(tmp):])
        _delete_prefix(fs, tmp)
    except BaseException:
        _delete_prefix(fs, tmp)
        if copied:
            _delete_prefix(fs, out)
        raise
