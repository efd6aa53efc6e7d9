"""Input files at a local path or an object-store URI, found one way for every stage.

Regroup and assign (:func:`rnb_ray.corpus.open_corpus`) and training (:func:`rnb_ray.balance.plan.prepare_plan`)
find what they read here:

* :func:`locate` — what a path or URI names: a file, a directory (an object-store prefix), or nothing. A missing
  bucket or a store that cannot be reached (credentials, endpoint) is an RnbError naming the URI.
* :func:`list_files` — the files under a location, recursively, in sorted path order (row ids and the embedding
  cache depend on that order), optionally only those with given suffixes. Anything below a name that starts
  with ``.`` or ``_`` is skipped (temporary outputs ``.OUT.tmp-*``, ``_SUCCESS`` markers), as pyarrow's dataset
  discovery does. A file location lists itself, whatever its suffix: the caller says what it accepts.
* :func:`hive_value` — the value of a ``key=value`` directory above a listed file (``domain=3``).
* :func:`open_stream`, :func:`pyarrow_source` — a listed file for pyarrow's readers, decompressed by extension.

Local paths stay plain ``pathlib`` paths, as given (``~`` expanded, relative paths kept relative, listed in
``Path`` order); a URI goes through its pyarrow filesystem (:mod:`rnb_ray.storage`), listed in path-string order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs

from rnb_ray import storage

HIDDEN_PREFIXES = (".", "_")
_HIVE = re.compile(r"^(?P<key>[^=/]+)=(?P<value>[^/]*)$")

Kind = Literal["file", "dir", "missing"]


@dataclass(frozen=True)
class Location:
    """A path or URI, resolved: which filesystem, and what is there."""

    given: str  # the local path (``~`` expanded), or the URI as given (its ``?options`` kept for joining)
    shown: str  # as messages name it: the local path, or the URI without options or a trailing ``/``
    fs: pafs.FileSystem | None = field(repr=False, compare=False)  # None: a local path
    path: str  # the local path, or the path inside ``fs``
    kind: Kind
    what: str  # what the location is for, in messages ("input", "--data")
    size: int = 0  # of a file
    mtime_ns: int = 0

    def child(self, name: str) -> Location:
        """The location ``name`` inside this one (a file or directory that may not exist)."""
        if self.fs is None:
            return _local(Path(self.path) / name, self.what)
        return _in_store(self.fs, f"{self.path}/{name}", storage.join(self.given, name), self.what)


@dataclass(frozen=True)
class ListedFile:
    """One file found by :func:`list_files`."""

    path: str  # the local path, or the path inside the location's filesystem
    shown: str  # as messages name it: the local path, or the file's URI
    size: int
    mtime_ns: int
    dirs: tuple[str, ...] = ()  # directories between the listed location and the file (hive ``key=value``)


def locate(path: str | Path, what: str, flag: str | None = None) -> Location:
    """What ``path`` (a local path or an object-store URI) names. ``what`` names it in messages; ``flag`` (default
    ``what``) is the option named when a URI cannot be opened at all (an unknown scheme)."""
    if not storage.is_uri(path):
        return _local(Path(path).expanduser(), what)
    uri = str(path)
    fs, inner = storage.resolve(uri, flag or what)
    storage.require_bucket(fs, inner, uri, what)
    return _in_store(fs, inner, uri, what)


def _local(p: Path, what: str) -> Location:
    kind: Kind = "file" if p.is_file() else "dir" if p.is_dir() else "missing"
    st = p.stat() if kind == "file" else None
    return Location(str(p), str(p), None, str(p), kind, what,
                    st.st_size if st else 0, st.st_mtime_ns if st else 0)


def _in_store(fs: pafs.FileSystem, path: str, uri: str, what: str) -> Location:
    fi = storage.info(fs, path, uri, what)
    kind: Kind = ("file" if fi.type == pafs.FileType.File else "dir" if fi.type == pafs.FileType.Directory
                  else "missing")
    return Location(uri, storage.strip_query(uri).rstrip("/"), fs, path, kind, what,
                    int(fi.size or 0) if kind == "file" else 0, int(fi.mtime_ns or 0) if kind == "file" else 0)


def list_files(loc: Location, suffixes: tuple[str, ...] | None = None) -> list[ListedFile]:
    """The files of ``loc``: itself when it is a file; else every file below it (recursively, sorted, hidden
    names skipped) whose name ends with one of ``suffixes`` (None: all). Nothing for a missing location."""
    if loc.kind == "file":
        return [ListedFile(loc.path, loc.shown, loc.size, loc.mtime_ns)]
    if loc.kind != "dir":
        return []
    out = []
    if loc.fs is None:
        root = Path(loc.path)
        for f in sorted(f for f in root.rglob("*") if f.is_file()):
            parts = f.relative_to(root).parts
            if _wanted(parts, suffixes):
                st = f.stat()
                out.append(ListedFile(str(f), str(f), st.st_size, st.st_mtime_ns, parts[:-1]))
        return out
    try:
        infos = storage.list_files(loc.fs, loc.path)  # sorted by path
    except OSError as e:
        raise storage.access_error(f"list {loc.what}", loc.shown, e) from e
    for i in infos:
        parts = storage.relative_parts(loc.path, i.path)
        if _wanted(parts, suffixes):
            out.append(ListedFile(i.path, storage.display_path(loc.fs, i.path), int(i.size or 0),
                                  int(i.mtime_ns or 0), parts[:-1]))
    return out


def _wanted(parts: tuple[str, ...], suffixes: tuple[str, ...] | None) -> bool:
    if any(part.startswith(HIDDEN_PREFIXES) for part in parts):
        return False
    return suffixes is None or parts[-1].endswith(suffixes)


def hive_value(f: ListedFile, key: str) -> str | None:
    """The value of the first ``key=value`` directory between the listed location and ``f``, else None."""
    for part in f.dirs:
        m = _HIVE.match(part)
        if m and m.group("key") == key:
            return m.group("value")
    return None


def open_stream(fs: pafs.FileSystem | None, path: str) -> pa.NativeFile:
    """A sequential stream of a local path (``fs`` None) or of ``path`` in ``fs``; ``.gz`` is decompressed."""
    if fs is None:
        return pa.input_stream(path)
    return fs.open_input_stream(path, compression="detect")


def pyarrow_source(fs: pafs.FileSystem | None, path: str, random_access: bool = False) -> str | pa.NativeFile:
    """What pyarrow's readers take for a file: a local path itself (pyarrow opens it, decompressing by extension),
    or the file opened in ``fs`` — for random access (parquet), or as a stream that decompresses ``.gz``."""
    if fs is None:
        return path
    return fs.open_input_file(path) if random_access else open_stream(fs, path)
