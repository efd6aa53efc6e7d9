"""Corpora on disk: find the input files, check them, and plan their reading — on the driver, before Ray.

Inputs are parquet, JSON Lines or CSV files (optionally ``.gz`` for the text formats), or directories (object-store
prefixes) of them, found through :mod:`rnb_ray.files`. Everything a user can get wrong is checked here from file
metadata and a small head of each file, *before* any Ray work starts; :func:`open_corpus` returns a
:class:`Corpus`: the files, their unified schema and the read tasks (fragments: a parquet row-group range, or a
whole text file).

Reading is :mod:`rnb_ray.corpus_read` (``Corpus.dataset()``: a Ray Data datasource, one read task per fragment).
It adds two internal columns:

* ``__rnb_row_id`` — int64, increasing in input order: ``file_index * 2**40 + row_within_file`` (files in sorted
  path order). The embedding cache keys rows by it, so embeddings join back to the corpus without a shuffle.
* ``__rnb_utf8_replaced`` — bool, the row had bytes that were not valid UTF-8 in a string column; they
  are decoded with U+FFFD replacement characters and counted (``n_replaced_utf8``), never fatal.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rnb_ray import files
from rnb_ray.errors import RnbError

ROW_ID = "__rnb_row_id"
REPLACED = "__rnb_utf8_replaced"
INTERNAL_COLUMNS = (ROW_ID, REPLACED)
FILE_SHIFT = 40  # row_id = file_index << 40 | row_within_file: 2**40 rows per file, 2**23 files

FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".jsonl.gz": "jsonl", ".ndjson.gz": "jsonl", ".json.gz": "jsonl",
    ".csv": "csv", ".csv.gz": "csv",
}
_FRAGMENT_ROWS = 100_000  # parquet row groups are grouped into read tasks of about this many rows
_HEAD_BYTES = 1 << 20  # bytes of each text file read on the driver to check its columns


def _suffix(path: str) -> str:
    name = Path(path).name.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return Path(name).suffix or "(no extension)"


def is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def _is_texty(tp: pa.DataType) -> bool:
    return is_string(tp) or pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_null(tp)


def list_input(input_path: str | Path) -> tuple[str, files.Location, list[files.ListedFile]]:
    """The corpus format, where it is, and its files (sorted), or an RnbError naming what is wrong."""
    loc = files.locate(input_path, "input", flag="--input")
    if loc.kind == "missing":
        if loc.fs is None:
            raise RnbError(f"input path {loc.shown} does not exist",
                           fix="check --input (a file or a directory of files)")
        raise RnbError(f"input {loc.shown} does not exist (no object or prefix of that name)", where=loc.shown,
                       fix="check --input (an object, or a prefix holding parquet, jsonl or csv files)")
    found = files.list_files(loc)
    container = "directory" if loc.fs is None else "prefix"
    if not found:
        raise RnbError(f"input {container} {loc.shown} holds no files", where=loc.shown,
                       fix="point --input at parquet, jsonl or csv files")
    unknown = [f for f in found if _suffix(f.path) not in FORMATS]
    if unknown:
        f = unknown[0]
        raise RnbError(
            f"unknown input format {_suffix(f.path)!r} for file {f.shown}",
            where=f.shown,
            fix=f"use parquet, jsonl or csv files (extensions: {', '.join(sorted(FORMATS))})"
            + (f"; move other files out of the input {container}" if loc.kind == "dir" else ""),
        )
    formats = {FORMATS[_suffix(f.path)] for f in found}
    if len(formats) > 1:
        raise RnbError(f"input directory {loc.shown} mixes formats ({', '.join(sorted(formats))})", where=loc.shown,
                       fix="keep one format per corpus (convert the others, or point --input at one kind)")
    if len(found) >= 1 << (63 - FILE_SHIFT):
        raise RnbError(f"input has {len(found)} files, more than rnb-ray supports", where=loc.shown)
    return formats.pop(), loc, found


@dataclass(frozen=True)
class Fragment:
    """One read task: a file, and for parquet a range of its row groups."""

    file_index: int
    path: str  # as shown to users: a local path, or the file's URI
    row_groups: tuple[int, ...] | None = None  # parquet only
    first_row: int = 0  # row within the file where this fragment starts
    num_rows: int | None = None  # known for parquet
    size_bytes: int = 0
    fs_path: str | None = None  # path inside Corpus.filesystem (object stores); None: local ``path``

    @property
    def open_path(self) -> str:
        """What to open: the path inside ``Corpus.filesystem``, or the local path."""
        return self.fs_path or self.path


@dataclass(frozen=True)
class Corpus:
    """A validated corpus: what to read and how. Cheap to build; holds no data."""

    input: str
    format: str
    files: tuple[str, ...]
    schema: pa.Schema
    text_column: str
    domain_column: str | None
    fragments: tuple[Fragment, ...]
    num_rows: int | None  # exact for parquet, None for text formats (known after reading)
    fingerprint: tuple[tuple[str, int, int], ...] = field(repr=False)  # (path, size, mtime_ns)
    # None: local files (read with plain paths). Else the pyarrow filesystem of the URIs, pickled into read tasks.
    filesystem: pafs.FileSystem | None = field(default=None, repr=False, compare=False)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def dataset(self, columns: list[str] | None = None, **read_args: Any):
        """The corpus as a Ray Dataset (streaming), with the internal row-id and UTF-8 columns."""
        import ray.data  # heavy; validation needs no Ray

        from rnb_ray.corpus_read import CorpusDatasource  # it imports this module

        # Reading is light next to embedding; reserving no CPU for it keeps an actor pool that takes
        # every CPU from starving the reads (Ray would otherwise wait forever).
        read_args.setdefault("num_cpus", 0)
        return ray.data.read_datasource(CorpusDatasource(self, columns), **read_args)


# --------------------------------------------------------------------------------------------------
# Checks on the driver: schemas and row counts from file metadata and heads.


def _head_bytes(f: files.ListedFile, fs: pafs.FileSystem | None, limit: int) -> bytes:
    with files.open_stream(fs, f.path) as stream:  # decompresses .gz
        data = stream.read(limit)
    if len(data) == limit:
        cut = data.rfind(b"\n")
        data = data[: cut + 1] if cut >= 0 else data
    return data


def parse_json_lines(data: bytes, where: str, schema: pa.Schema | None = None, first_line: int = 1) -> pa.Table:
    """Parse JSON Lines bytes (blank lines skipped); errors name the file and its line number."""
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    if not lines:
        return pa.table({})
    opts = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore") if schema else None
    try:
        return pajson.read_json(io.BytesIO(b"\n".join(lines)), parse_options=opts)
    except pa.ArrowInvalid as e:
        line, detail = None, str(e)
        for i, ln in enumerate(data.split(b"\n")):  # find the culprit ourselves: pyarrow counts per block
            if not ln.strip():
                continue
            try:
                if not isinstance(json.loads(ln), dict):
                    line, detail = first_line + i, "not a JSON object"
                    break
            except ValueError as je:
                line, detail = first_line + i, str(je)
                break
        at = f"{where}:{line}" if line else where
        raise RnbError(f"file {where} is not valid JSON Lines: line {line}: {detail}" if line else
                       f"file {where} is not valid JSON Lines: {detail}", where=at,
                       fix="one JSON object per line with consistent field types; fix or remove the bad line") from e


def _jsonl_schema(f: files.ListedFile, fs: pafs.FileSystem | None, limit: int) -> tuple[pa.Schema, bool]:
    """Schema of the head of a JSON Lines file and whether the file has at least one row."""
    table = parse_json_lines(_head_bytes(f, fs, limit), f.shown)
    return table.schema, table.num_rows > 0


def _csv_schema(f: files.ListedFile, fs: pafs.FileSystem | None) -> tuple[pa.Schema, bool]:
    """Schema of a CSV file (its header and first block) and whether the file has at least one row."""
    try:
        reader = pacsv.open_csv(
            files.pyarrow_source(fs, f.path),
            read_options=pacsv.ReadOptions(block_size=_HEAD_BYTES),
            convert_options=pacsv.ConvertOptions(check_utf8=False),
        )
        schema = reader.schema
        try:
            first = reader.read_next_batch()
            has_rows = first.num_rows > 0
        except StopIteration:
            has_rows = False
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return pa.schema([]), False
        raise RnbError(f"file {f.shown} is not valid CSV: {e}", where=f.shown,
                       fix="a header line, then comma-separated rows") from e
    return schema, has_rows


def _parquet_fragments(i: int, f: files.ListedFile, fs: pafs.FileSystem | None
                       ) -> tuple[pa.Schema, pq.FileMetaData, list[Fragment]]:
    """A parquet file's schema and metadata, and its row groups grouped into read tasks of ~_FRAGMENT_ROWS."""
    try:
        if fs is None:
            meta = pq.ParquetFile(f.path).metadata
            schema = pq.read_schema(f.path)
        else:
            pf = pq.ParquetFile(files.pyarrow_source(fs, f.path, random_access=True))
            meta, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise RnbError(f"file {f.shown} is not a readable parquet file: {e}", where=f.shown) from e
    fs_path = f.path if fs is not None else None
    fragments = []
    row = 0
    group: list[int] = []
    group_rows = 0
    for rg in range(meta.num_row_groups):
        group.append(rg)
        group_rows += meta.row_group(rg).num_rows
        if group_rows >= _FRAGMENT_ROWS or rg == meta.num_row_groups - 1:
            fragments.append(Fragment(i, f.shown, tuple(group), row, group_rows, f.size, fs_path))
            row += group_rows
            group, group_rows = [], 0
    return schema, meta, fragments


def _check_columns(schema: pa.Schema, f: files.ListedFile, text_column: str, domain_column: str | None) -> None:
    for col, what in ((text_column, "text"), (domain_column, "domain")):
        if col is not None and col not in schema.names:
            raise RnbError(
                f"{what} column {col!r} not found in {f.shown}",
                where=f.shown,
                fix=f"pass --{what}-column with one of: {', '.join(schema.names) or '(no columns)'}",
            )
    tf = schema.field(text_column)
    if not _is_texty(tf.type):
        raise RnbError(f"text column {text_column!r} in {f.shown} has type {tf.type}, not text", where=f.shown,
                       fix="pass --text-column naming a string column")


def _normalise_schema(schema: pa.Schema, text_column: str, fmt: str) -> pa.Schema:
    """The text column is read as a string; so are columns a text-format head left null or binary
    (CSV infers binary for cells that are not valid UTF-8). Parquet binary columns stay binary."""
    fields = []
    for f in schema:
        tp = f.type
        if f.name == text_column:
            tp = pa.large_string() if pa.types.is_large_string(tp) or pa.types.is_large_binary(tp) else pa.string()
        elif pa.types.is_null(tp) or (fmt != "parquet" and pa.types.is_binary(tp)):
            tp = pa.string()
        elif fmt != "parquet" and pa.types.is_large_binary(tp):
            tp = pa.large_string()
        fields.append(pa.field(f.name, tp))
    return pa.schema(fields)


def open_corpus(input_path: str | Path, text_column: str = "text", domain_column: str | None = None) -> Corpus:
    """Find, check and plan the reading of a corpus. Raises RnbError; starts no Ray work."""
    fmt, loc, found = list_input(input_path)
    fs = loc.fs
    schemas: list[pa.Schema] = []
    fragments: list[Fragment] = []
    any_rows = False
    total_rows: int | None = 0 if fmt == "parquet" else None
    for i, f in enumerate(found):
        if fmt == "parquet":
            schema, meta, parts = _parquet_fragments(i, f, fs)
            fragments.extend(parts)
            any_rows = any_rows or meta.num_rows > 0
            assert total_rows is not None
            total_rows += meta.num_rows
        else:
            try:
                if fmt == "jsonl":
                    schema, has_rows = _jsonl_schema(f, fs, _HEAD_BYTES if i == 0 else _HEAD_BYTES // 16)
                else:
                    schema, has_rows = _csv_schema(f, fs)
            except OSError as e:
                raise RnbError(f"cannot read file {f.shown}: {e}", where=f.shown) from e
            any_rows = any_rows or has_rows
            if not has_rows:
                continue  # an empty text file contributes nothing (and has no columns to check)
            fragments.append(Fragment(i, f.shown, size_bytes=f.size, fs_path=f.path if fs is not None else None))
        _check_columns(schema, f, text_column, domain_column)
        schemas.append(schema)
    if not any_rows:
        raise RnbError(f"corpus {input_path} is empty (no rows in {len(found)} file(s))", where=str(input_path),
                       fix="point --input at a corpus with documents")
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RnbError(f"files of {input_path} have incompatible columns: {e}", where=str(input_path),
                       fix="give every file the same columns and types") from e
    schema = _normalise_schema(schema, text_column, fmt)
    for reserved in INTERNAL_COLUMNS:
        if reserved in schema.names:
            raise RnbError(f"column {reserved!r} is reserved by rnb-ray", where=str(input_path),
                           fix="rename that column")
    # Local files by their resolved path, object-store files by their URI (see ARCHITECTURE.md, embedding cache).
    fingerprint = tuple((str(Path(f.path).resolve()) if fs is None else f.shown, f.size, f.mtime_ns) for f in found)
    return Corpus(str(input_path), fmt, tuple(f.shown for f in found), schema, text_column, domain_column,
                  tuple(fragments), total_rows, fingerprint, fs)
