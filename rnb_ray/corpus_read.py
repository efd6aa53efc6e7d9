"""Reading a validated :class:`~rnb_ray.corpus.Corpus`: blocks of each fragment, and the Ray Data datasource.

Runs in Ray read tasks (or directly, without Ray: :func:`read_fragment`). Every block is cast to the corpus
schema and gets the internal columns ``__rnb_row_id`` (``file_index * 2**40 + row_within_file``) and
``__rnb_utf8_replaced`` (the row had bytes that were not valid UTF-8, decoded with U+FFFD); see
:mod:`rnb_ray.corpus`. Text files are streamed in chunks of ``_CHUNK_BYTES``; parquet in batches of its row groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rnb_ray import files
from rnb_ray.corpus import FILE_SHIFT, REPLACED, ROW_ID, Corpus, Fragment, is_string, parse_json_lines
from rnb_ray.errors import RnbError

_CHUNK_BYTES = 8 << 20  # text files are parsed in chunks of this size


def fix_utf8(table: pa.Table, schema: pa.Schema,
             replaced: np.ndarray | None = None) -> tuple[pa.Table, np.ndarray]:
    """Decode invalid UTF-8 with U+FFFD in columns that ``schema`` wants as strings; flag those rows.

    String columns are checked (fast path: they are valid); binary columns that should be strings
    (a binary text column, or CSV cells pyarrow could not decode) are decoded. Other columns are kept.
    """
    replaced = np.zeros(table.num_rows, dtype=bool) if replaced is None else replaced
    for i, f in enumerate(table.schema):
        if f.name not in schema.names or not is_string(schema.field(f.name).type):
            continue
        col = table.column(i)
        if is_string(f.type):
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
    pf = pq.ParquetFile(files.pyarrow_source(fs, fragment.open_path, random_access=True))
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
    with files.open_stream(fs, fragment.open_path) as f:
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
                table = parse_json_lines(data, fragment.path, schema, line_no)
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
            files.pyarrow_source(fs, fragment.open_path),
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


class CorpusDatasource(Datasource):
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
