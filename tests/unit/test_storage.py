"""rnb_ray.storage and the corpus reader on s3:// URIs, against a real local S3 server (moto), no Ray."""

from __future__ import annotations

import gzip
import json
import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rnb_ray import storage
from rnb_ray.corpus import ROW_ID, open_corpus
from rnb_ray.corpus_read import read_fragment
from rnb_ray.errors import RnbError
from rnb_ray.outputs import atomic_output, check_output_dir

BUCKET = "rnb-unit"


@pytest.fixture(scope="module")
def s3(local_s3):
    return local_s3


def _keys(fs, prefix=BUCKET) -> list[str]:
    return [i.path for i in storage.list_files(fs, prefix)]


def test_uri_or_local_path():
    assert storage.is_uri("s3://b/p") and storage.is_uri("gs://b/p") and storage.is_uri("hdfs://h:1/p")
    assert not storage.is_uri("data/x") and not storage.is_uri("/abs/x") and not storage.is_uri("file:///abs/x")
    assert not storage.is_uri(None)
    fs, path = storage.resolve("file:///tmp/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/x"
    assert storage.join("s3://b/p/?endpoint_override=h:1", "data", "x") == "s3://b/p/data/x?endpoint_override=h:1"
    assert storage.relative_parts("b/root", "b/root/domain=1/part.parquet") == ("domain=1", "part.parquet")


def test_unknown_scheme_is_an_rnb_error():
    with pytest.raises(RnbError, match="cannot open --input nosuch://x"):
        storage.resolve("nosuch://x/y", "--input")


def test_endpoint_and_env_credentials_travel_with_the_pickled_filesystem(s3):
    fs, path = storage.resolve(f"s3://{BUCKET}/some/prefix", "--input")
    assert path == f"{BUCKET}/some/prefix"
    options = pickle.loads(pickle.dumps(fs)).__reduce__()[1][0]
    assert options["endpoint_override"].startswith("http://127.0.0.1:")  # from AWS_ENDPOINT_URL
    assert options["access_key"] == "testing" and options["secret_key"] == "testing"
    assert fs.get_file_info(BUCKET).type == pafs.FileType.Directory  # it really reaches the server


def test_corpus_formats_read_the_same_from_s3_as_locally(s3, tmp_path):
    rows = [{"id": f"d{i}", "text": f"document number {i}", "source": "abc"[i % 3]} for i in range(50)]
    local = tmp_path / "c.jsonl.gz"
    local.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with s3.open_output_stream(f"{BUCKET}/jsonl/c.jsonl.gz", compression=None) as f:  # already gzipped
        f.write(local.read_bytes())
    pq.write_table(pa.Table.from_pylist(rows), f"{BUCKET}/pq/a.parquet", filesystem=s3, row_group_size=16)
    with s3.open_output_stream(f"{BUCKET}/csv/a.csv") as f:
        f.write(("id,text,source\n" + "".join(f"{r['id']},{r['text']},{r['source']}\n" for r in rows)).encode())
    for uri in (f"s3://{BUCKET}/jsonl/", f"s3://{BUCKET}/pq", f"s3://{BUCKET}/csv/a.csv"):
        corpus = open_corpus(uri, "text", "source")
        assert corpus.filesystem is not None and corpus.files[0].startswith(f"s3://{BUCKET}/")
        assert all(fp[0].startswith("s3://") and fp[1] > 0 and fp[2] > 0 for fp in corpus.fingerprint)
        corpus = pickle.loads(pickle.dumps(corpus))  # as a Ray read task receives it
        table = pa.concat_tables([t for frag in corpus.fragments for t in read_fragment(corpus, frag)])
        assert table.column("text").to_pylist() == [r["text"] for r in rows], uri
        assert table.column(ROW_ID).to_pylist() == list(range(50))
    local_corpus = open_corpus(local, "text")
    assert local_corpus.filesystem is None and local_corpus.fragments[0].fs_path is None


def test_missing_bucket_prefix_and_bad_files_name_the_uri(s3):
    with pytest.raises(RnbError, match=r"bucket 'no-such-bucket-x' of input s3://no-such-bucket-x/c does not exist"):
        open_corpus("s3://no-such-bucket-x/c")
    with pytest.raises(RnbError, match=rf"input s3://{BUCKET}/nothing/here does not exist"):
        open_corpus(f"s3://{BUCKET}/nothing/here/")
    with s3.open_output_stream(f"{BUCKET}/bad/x.txt") as f:
        f.write(b"hello")
    with pytest.raises(RnbError, match=rf"unknown input format '.txt' for file s3://{BUCKET}/bad/x.txt"):
        open_corpus(f"s3://{BUCKET}/bad")
    with s3.open_output_stream(f"{BUCKET}/badpq/x.parquet") as f:
        f.write(b"not parquet at all")
    with pytest.raises(RnbError, match=rf"file s3://{BUCKET}/badpq/x.parquet is not a readable parquet file"):
        open_corpus(f"s3://{BUCKET}/badpq/")


def test_output_prefix_checks(s3):
    with pytest.raises(RnbError, match="bucket 'no-such-bucket-y' of output s3://no-such-bucket-y/out does not exist"):
        check_output_dir("s3://no-such-bucket-y/out", overwrite=False)
    with pytest.raises(RnbError, match="is a bucket, not a prefix"):
        check_output_dir(f"s3://{BUCKET}", overwrite=False)
    with s3.open_output_stream(f"{BUCKET}/taken/x") as f:
        f.write(b"x")
    with pytest.raises(RnbError, match=f"output s3://{BUCKET}/taken exists and is not empty"):
        check_output_dir(f"s3://{BUCKET}/taken", overwrite=False)
    assert check_output_dir(f"s3://{BUCKET}/taken", overwrite=True) == f"s3://{BUCKET}/taken"


def test_atomic_output_prefix_writes_nothing_on_failure_and_replaces_on_success(s3):
    out = f"s3://{BUCKET}/atomic/out"
    before = _keys(s3)
    with pytest.raises(RuntimeError, match="boom"), atomic_output(out, False, marker="done.json") as tmp:
        assert tmp.fs is not None and "/.out.tmp-" in tmp.path
        tmp.write_text("part.txt", "half")
        assert len(_keys(s3)) == len(before) + 1  # really written, under the temporary prefix
        raise RuntimeError("boom")
    assert _keys(s3) == before  # no temporary prefix left, nothing at out

    with atomic_output(out, False, marker="done.json") as tmp:
        tmp.write_text("old.txt", "old")
        tmp.write_text("done.json", "{}")
    assert _keys(s3, f"{BUCKET}/atomic") == [f"{BUCKET}/atomic/out/done.json", f"{BUCKET}/atomic/out/old.txt"]

    with atomic_output(out, True, marker="done.json") as tmp:  # --overwrite: old files do not linger
        tmp.write_text("sub/new.txt", "new")
        tmp.save_npy("c.npy", pa.array([1.0, 2.0]).to_numpy())
        tmp.write_text("done.json", '{"v": 2}')
    assert _keys(s3, f"{BUCKET}/atomic") == [f"{BUCKET}/atomic/out/c.npy", f"{BUCKET}/atomic/out/done.json",
                                             f"{BUCKET}/atomic/out/sub/new.txt"]
    assert storage.read_bytes(s3, f"{BUCKET}/atomic/out/done.json") == b'{"v": 2}'

    with pytest.raises(RuntimeError, match="lacks its marker"), atomic_output(f"{out}2", False, marker="done.json") as tmp:
        tmp.write_text("x.txt", "no marker: refused, nothing copied")
    assert s3.get_file_info(f"{BUCKET}/atomic/out2").type == pafs.FileType.NotFound


def test_local_atomic_output_is_the_plain_directory(tmp_path):
    with atomic_output(tmp_path / "o", False, marker="m.json") as tmp:
        assert tmp.fs is None and tmp.local.parent == tmp_path and tmp.local.name.startswith(".o.tmp-")
        tmp.write_text("m.json", "{}")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["m.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
