"""Corpora on disk: find and validate input files, read them as a Ray Dataset, write outputs atomically.

Inputs are parquet, JSON Lines or CSV files (optionally ``.gz`` for the text formats), or directories
of them. Everything a user can get wrong is checked here on the driver from file metadata and a small
head of each file, *before* any Ray work starts.

Reading goes through :class:`CorpusDatasource`, a Ray Data datasource with one read task per fragment
(a parquet row-group range, or a whole text file streamed in chunks). It adds two internal columns:

* ``__rnb_row_id`` — int64, increasing in input order: ``file_index * 2**40 + row_within_file``. The
  embedding cache keys rows by it, so embeddings join back to the corpus without a shuffle.
* ``__rnb_utf8_replaced`` — bool, the row had bytes that were not valid UTF-8 in a string column; they
  are decoded with U+FFFD replacement characters and counted (``n_replaced_utf8``), never fatal.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rnb_ray import atomic, storage
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
_CHUNK_BYTES = 8 << 20  # text files are parsed in chunks of this size
_HEAD_BYTES = 1 << 20  # bytes of each text file read on the driver to check its columns


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower() or "(no extension)"


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def _is_texty(tp: pa.DataType) -> bool:
    return _is_string(tp) or pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_null(tp)


def list_input_files(input_path: str | Path) -> tuple[str, list[Path]]:
    """The corpus format and its files (sorted), or an RnbError naming what is wrong."""
    p = Path(input_path).expanduser()
    if not p.exists():
        raise RnbError(f"input path {p} does not exist", fix="check --input (a file or a directory of files)")
    if p.is_file():
        files = [p]
    else:
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
        )
        if not files:
            raise RnbError(f"input directory {p} holds no files", where=str(p),
                           fix="point --input at parquet, jsonl or csv files")
    unknown = [f for f in files if _suffix(f) not in FORMATS]
    if unknown:
        f = unknown[0]
        raise RnbError(
            f"unknown input format {_suffix(f)!r} for file {f}",
            where=str(f),
            fix=f"use parquet, jsonl or csv files (extensions: {', '.join(sorted(FORMATS))})"
            + ("; move other files out of the input directory" if p.is_dir() else ""),
        )
    return _one_format(files, str(p)), files


def _one_format(files: list, where: str) -> str:
    formats = {FORMATS[_suffix(Path(f))] for f in files}
    if len(formats) > 1:
        raise RnbError(f"input directory {where} mixes formats ({', '.join(sorted(formats))})", where=where,
                       fix="keep one format per corpus (convert the others, or point --input at one kind)")
    if len(files) >= 1 << (63 - FILE_SHIFT):
        raise RnbError(f"input has {len(files)} files, more than rnb-ray supports", where=where)
    return formats.pop()


@dataclass(frozen=True)
class RemoteFile:
    """A corpus file in an object store: its URI (for messages), path inside ``fs``, size and mtime."""

    uri: str
    path: str
    size: int
    mtime_ns: int


def list_input_uri(uri: str) -> tuple[str, pafs.FileSystem, list[RemoteFile]]:
    """Like :func:`list_input_files` for ``s3://``/``gs://`` URIs (a file or a prefix of files)."""
    fs, root = storage.resolve(uri, "--input")
    shown = storage.strip_query(uri).rstrip("/")
    storage.require_bucket(fs, root, uri, "input")
    fi = storage.info(fs, root, uri, "input")
    if fi.type == pafs.FileType.NotFound:
        raise RnbError(f"input {shown} does not exist (no object or prefix of that name)", where=shown,
                       fix="check --input (an object, or a prefix holding parquet, jsonl or csv files)")
    if fi.type == pafs.FileType.File:
        infos = [fi]
    else:
        try:
            infos = [i for i in storage.list_files(fs, root)
                     if not any(part.startswith((".", "_")) for part in storage.relative_parts(root, i.path))]
        except OSError as e:
            raise RnbError(f"cannot list input {shown}: {e}", where=shown, fix=storage._CRED_FIX) from e
        if not infos:
            raise RnbError(f"input prefix {shown} holds no files", where=shown,
                           fix="point --input at parquet, jsonl or csv files")
    files = [RemoteFile(storage.display_path(fs, i.path), i.path, int(i.size or 0), int(i.mtime_ns or 0))
             for i in infos]
    unknown = [f for f in files if _suffix(Path(f.path)) not in FORMATS]
    if unknown:
        f = unknown[0]
        raise RnbError(
            f"unknown input format {_suffix(Path(f.path))!r} for file {f.uri}", where=f.uri,
            fix=f"use parquet, jsonl or csv files (extensions: {', '.join(sorted(FORMATS))})"
            + ("; move other files out of the input prefix" if fi.type == pafs.FileType.Directory else ""),
        )
    return _one_format([f.path for f in files], shown), fs, files


# --------------------------------------------------------------------------------------------------
# Validation on the driver: schemas and row counts from metadata and file heads.


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
        import ray.data

        # Reading is light next to embedding; reserving no CPU for it keeps an actor pool that takes
        # every CPU from starving the reads (Ray would otherwise wait forever).
        read_args.setdefault("num_cpus", 0)
        return ray.data.read_datasource(CorpusDatasource(self, columns), **read_args)


def _input_stream(path: str, fs: pafs.FileSystem | None, fs_path: str | None):
    """A readable stream of a corpus file that decompresses ``.gz``: local path, or a path in ``fs``."""
    if fs is None:
        return pa.input_stream(str(path))
    return fs.open_input_stream(fs_path or path, compression="detect")


def _parquet_file(path: str, fs: pafs.FileSystem | None, fs_path: str | None) -> pq.ParquetFile:
    if fs is None:
        return pq.ParquetFile(str(path))
    return pq.ParquetFile(fs.open_input_file(fs_path or path))


def _head_bytes(path: Path | str, limit: int, fs: pafs.FileSystem | None = None, fs_path: str | None = None) -> bytes:
    with _input_stream(str(path), fs, fs_path) as f:  # decompresses .gz
        data = f.read(limit)
    if len(data) == limit:
        cut = data.rfind(b"\n")
        data = data[: cut + 1] if cut >= 0 else data
    return data


def _read_json_bytes(data: bytes, where: str, schema: pa.Schema | None = None, first_line: int = 1) -> pa.Table:
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


def _jsonl_schema(path: Path | str, limit: int, fs: pafs.FileSystem | None = None,
                  fs_path: str | None = None) -> tuple[pa.Schema, bool]:
    """Schema of the head of a JSON Lines file and whether the file has at least one row."""
    head = _head_bytes(path, limit, fs, fs_path)
    table = _read_json_bytes(head, str(path))
    return table.schema, table.num_rows > 0


def _csv_schema(path: Path | str, fs: pafs.FileSystem | None = None,
                fs_path: str | None = None) -> tuple[pa.Schema, bool]:
    try:
        reader = pacsv.open_csv(
            str(path) if fs is None else _input_stream(str(path), fs, fs_path),
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
        raise RnbError(f"file {path} is not valid CSV: {e}", where=str(path),
                       fix="a header line, then comma-separated rows") from e
    return schema, has_rows


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
    fs: pafs.FileSystem | None = None
    if storage.is_uri(input_path):
        fmt, fs, remote = list_input_uri(str(input_path))
        files: list[Any] = [r.uri for r in remote]
        fs_paths: list[str | None] = [r.path for r in remote]
        sizes = [r.size for r in remote]
    else:
        fmt, files = list_input_files(input_path)
        fs_paths = [None] * len(files)
        sizes = [f.stat().st_size for f in files]
    schemas: list[pa.Schema] = []
    fragments: list[Fragment] = []
    any_rows = False
    total_rows: int | None = 0 if fmt == "parquet" else None
    for i, f in enumerate(files):
        fsp = fs_paths[i]
        if fmt == "parquet":
            try:
                if fs is None:
                    meta = pq.ParquetFile(str(f)).metadata
                    schema = pq.read_schema(str(f))
                else:
                    pf = _parquet_file(f, fs, fsp)
                    meta, schema = pf.metadata, pf.schema_arrow
            except (pa.ArrowInvalid, OSError) as e:
                raise RnbError(f"file {f} is not a readable parquet file: {e}", where=str(f)) from e
            row = 0
            group: list[int] = []
            group_rows = 0
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                group.append(rg)
                group_rows += n
                if group_rows >= _FRAGMENT_ROWS or rg == meta.num_row_groups - 1:
                    fragments.append(Fragment(i, str(f), tuple(group), row, group_rows, sizes[i], fsp))
                    row += group_rows
                    group, group_rows = [], 0
            any_rows = any_rows or meta.num_rows > 0
            assert total_rows is not None
            total_rows += meta.num_rows
        else:
            try:
                if fmt == "jsonl":
                    schema, has_rows = _jsonl_schema(f, _HEAD_BYTES if i == 0 else _HEAD_BYTES // 16, fs, fsp)
                else:
                    schema, has_rows = _csv_schema(f, fs, fsp)
            except OSError as e:
                raise RnbError(f"cannot read file {f}: {e}", where=str(f)) from e
            any_rows = any_rows or has_rows
            if not has_rows:
                continue  # an empty text file contributes nothing (and has no columns to check)
            fragments.append(Fragment(i, str(f), size_bytes=sizes[i], fs_path=fsp))
        for col, what in ((text_column, "text"), (domain_column, "domain")):
            if col is not None and col not in schema.names:
                raise RnbError(
                    f"{what} column {col!r} not found in {f}",
                    where=str(f),
                    fix=f"pass --{what}-column with one of: {', '.join(schema.names) or '(no columns)'}",
                )
        tf = schema.field(text_column)
        if not _is_texty(tf.type):
            raise RnbError(f"text column {text_column!r} in {f} has type {tf.type}, not text", where=str(f),
                           fix="pass --text-column naming a string column")
        schemas.append(schema)
    if not any_rows:
        raise RnbError(f"corpus {input_path} is empty (no rows in {len(files)} file(s))", where=str(input_path),
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
    if fs is None:
        fingerprint = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    else:
        fingerprint = tuple((r.uri, r.size, r.mtime_ns) for r in remote)
    return Corpus(str(input_path), fmt, tuple(map(str, files)), schema, text_column, domain_column,
                  tuple(fragments), total_rows, fingerprint, fs)


# --------------------------------------------------------------------------------------------------
# Reading (runs in Ray tasks).


def fix_utf8(table: pa.Table, schema: pa.Schema,
             replaced: np.ndarray | None = None) -> tuple[pa.Table, np.ndarray]:
    """Decode invalid UTF-8 with U+FFFD in columns that ``schema`` wants as strings; flag those rows.

    String columns are checked (fast path: they are valid); binary columns that should be strings
    (a binary text column, or CSV cells pyarrow could not decode) are decoded. Other columns are kept.
    """
    replaced = np.zeros(table.num_rows, dtype=bool) if replaced is None else replaced
    for i, f in enumerate(table.schema):
        if f.name not in schema.names or not _is_string(schema.field(f.name).type):
            continue
        col = table.column(i)
        if _is_string(f.type):
            try:
                col.validate(full=True)
                continue
            except pa.ArrowInvalid:
                pass
        elif not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)):
            continue
        out: list[str | None] = []
        for r, v in enumerate(col.cast(pa.large_binary()).to_pylist()):
            if v is None:
                out.append(None)
                continue
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(v.decode("utf-8", errors="replace"))
                replaced[r] = True
        table = table.set_column(i, f.name, pa.array(out, schema.field(f.name).type))
    return table, replaced


def _conform(table: pa.Table, schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    """Select/cast a block to the corpus schema (missing columns become nulls)."""
    names = columns if columns is not None else schema.names
    arrays = []
    for name in names:
        tp = schema.field(name).type
        if name in table.column_names:
            arrays.append(table.column(name).cast(tp))
        else:
            arrays.append(pa.nulls(table.num_rows, tp))
    return pa.table(arrays, schema=pa.schema([schema.field(n) for n in names]))


def _finish(table: pa.Table, schema: pa.Schema, columns: list[str] | None, fragment: Fragment,
            start: int, replaced: np.ndarray | None = None) -> pa.Table:
    table, replaced = fix_utf8(table, schema, replaced)
    table = _conform(table, schema, columns)
    row_ids = (np.int64(fragment.file_index) << FILE_SHIFT) + np.arange(start, start + table.num_rows,
                                                                         dtype=np.int64)
    table = table.append_column(ROW_ID, pa.array(row_ids, pa.int64()))
    return table.append_column(REPLACED, pa.array(replaced, pa.bool_()))


def _iter_parquet(fragment: Fragment, schema: pa.Schema, columns: list[str] | None,
                  fs: pafs.FileSystem | None = None) -> Iterator[pa.Table]:
    pf = _parquet_file(fragment.path, fs, fragment.fs_path)
    file_cols = pf.schema_arrow.names
    read_cols = [c for c in (columns or schema.names) if c in file_cols]
    start = fragment.first_row
    for batch in pf.iter_batches(batch_size=16_384, row_groups=list(fragment.row_groups or ()), columns=read_cols):
        table = pa.Table.from_batches([batch])
        yield _finish(table, schema, columns, fragment, start)
        start += table.num_rows


def _iter_jsonl(fragment: Fragment, schema: pa.Schema, columns: list[str] | None,
                fs: pafs.FileSystem | None = None) -> Iterator[pa.Table]:
    start = 0
    line_no = 1  # file line number of the first line of the current chunk
    tail = b""
    with _input_stream(fragment.path, fs, fragment.fs_path) as f:
        while True:
            data = f.read(_CHUNK_BYTES)
            eof = not data
            data = tail + data
            if not eof:
                cut = data.rfind(b"\n")
                if cut < 0:
                    tail = data
                    continue
                data, tail = data[: cut + 1], data[cut + 1:]
            else:
                tail = b""
            lines = [ln for ln in data.split(b"\n") if ln.strip()]
            if lines:
                replaced = np.zeros(len(lines), dtype=bool)
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:  # find the lines (rows) that pyarrow decodes with U+FFFD
                    for r, ln in enumerate(lines):
                        try:
                            ln.decode("utf-8")
                        except UnicodeDecodeError:
                            replaced[r] = True
                table = _read_json_bytes(data, fragment.path, schema, line_no)
                if table.num_rows != len(lines):
                    raise RnbError(f"file {fragment.path}: {len(lines)} lines parsed into {table.num_rows} rows",
                                   where=fragment.path, fix="one JSON object per line")
                yield _finish(table, schema, columns, fragment, start, replaced)
                start += table.num_rows
            line_no += data.count(b"\n")
            if eof:
                return


def _iter_csv(fragment: Fragment, schema: pa.Schema, columns: list[str] | None,
              fs: pafs.FileSystem | None = None) -> Iterator[pa.Table]:
    try:
        reader = pacsv.open_csv(
            fragment.path if fs is None else _input_stream(fragment.path, fs, fragment.fs_path),
            read_options=pacsv.ReadOptions(block_size=_CHUNK_BYTES),
            convert_options=pacsv.ConvertOptions(
                column_types={f.name: f.type for f in schema}, check_utf8=False,
                include_columns=columns,
            ),
        )
        start = 0
        for batch in reader:
            table = pa.Table.from_batches([batch])
            yield _finish(table, schema, columns, fragment, start)
            start += table.num_rows
    except pa.ArrowInvalid as e:
        raise RnbError(f"file {fragment.path} could not be read as CSV: {e}", where=fragment.path,
                       fix="fix the malformed row or column type") from e


_READERS = {"parquet": _iter_parquet, "jsonl": _iter_jsonl, "csv": _iter_csv}


def read_fragment(corpus: Corpus, fragment: Fragment, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Blocks of one fragment, with the internal row-id and UTF-8 columns (also usable without Ray)."""
    yield from _READERS[corpus.format](fragment, corpus.schema, columns, corpus.filesystem)


try:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
except ImportError:  # pragma: no cover - Ray is a hard dependency; keeps pure imports light in docs builds
    Datasource = object  # type: ignore[misc,assignment]


class CorpusDatasource(Datasource):  # type: ignore[misc]
    """Ray Data datasource: one read task per fragment of a validated :class:`Corpus`."""

    def __init__(self, corpus: Corpus, columns: list[str] | None = None):
        super().__init__()
        self._corpus = corpus
        self._columns = columns

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(f.size_bytes for f in self._corpus.fragments) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list:
        corpus, columns = self._corpus, self._columns
        names = columns if columns is not None else corpus.schema.names
        out_schema = pa.schema([corpus.schema.field(n) for n in names]
                               + [pa.field(ROW_ID, pa.int64()), pa.field(REPLACED, pa.bool_())])
        tasks = []
        for frag in corpus.fragments:
            def read_fn(frag: Fragment = frag) -> Iterator[pa.Table]:
                yield from read_fragment(corpus, frag, columns)

            meta = BlockMetadata(num_rows=frag.num_rows, size_bytes=frag.size_bytes or None,
                                 exec_stats=None, input_files=[frag.path])
            tasks.append(ReadTask(read_fn, meta, schema=out_schema, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadCorpus"


# --------------------------------------------------------------------------------------------------
# Atomic output directories.


def check_output_dir(output: str | Path, overwrite: bool) -> Path:
    """An output path we may write: absent, an empty directory, or anything with ``overwrite``.

    For an object-store URI: its bucket exists, and nothing is under the prefix (or ``overwrite``); the
    URI is returned unchanged (as a str).
    """
    if storage.is_uri(output):
        storage.check_output_prefix(str(output), overwrite)
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
def atomic_output(output: str | Path, overwrite: bool, marker: str) -> Iterator[storage.OutputDir]:
    """:func:`atomic_output_dir` for a local path or an object-store URI.

    Local: a temporary directory beside ``output``, renamed into place (``OutputDir.fs`` is None). URI: a
    temporary prefix ``.<name>.tmp-*`` beside it, copied into place with ``marker`` last, then deleted
    (see :func:`rnb_ray.storage.atomic_output_prefix`). Either way a failure leaves nothing at ``output``.
    """
    if storage.is_uri(output):
        with storage.atomic_output_prefix(str(output), overwrite, marker) as (fs, tmp):
            yield storage.OutputDir(fs, tmp)
    else:
        with atomic_output_dir(output, overwrite) as tmp:
            yield storage.OutputDir(None, str(tmp))
