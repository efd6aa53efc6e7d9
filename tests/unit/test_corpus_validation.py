"""Bad input is refused before any Ray work, with an error naming the file/column/value; readers agree.

Everything here runs without Ray: `rnb regroup` validates settings, output directory, model and corpus
on the driver first (the checks that need a full pass — all texts empty, k above the number of
non-empty documents — are in tests/integration/test_regroup.py).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnb_ray.cli import main
from rnb_ray.corpus import FILE_SHIFT, REPLACED, ROW_ID, open_corpus
from rnb_ray.corpus_read import read_fragment
from rnb_ray.errors import RnbError
from rnb_ray.outputs import atomic_output_dir
from rnb_ray.regroup.config import RegroupConfig
from rnb_ray.regroup.regroup import validate

ROWS = [
    {"id": "a", "text": "first document about sockets", "source": "socket"},
    {"id": "b", "text": "second document about json", "source": "json"},
    {"id": "c", "text": "   ", "source": "json"},
    {"id": "d", "text": "fourth document about csv files", "source": "csv"},
]


def write_parquet(path, rows=ROWS):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows=ROWS):
    lines = ["id,text,source"] + [f'{r["id"]},"{r["text"]}",{r["source"]}' for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def regroup_cli(tmp_path, capsys, *extra, input_path=None, out="out"):
    argv = ["regroup", "--output", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache")]
    if input_path is not None:
        argv += ["--input", str(input_path)]
    return run_cli(argv + list(extra), capsys)


def assert_refused(code, err, tmp_path, *needles, out="out"):
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert "Traceback" not in err
    assert not (tmp_path / out).exists(), "a refused run must leave no output"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out}.tmp")]
    assert not leftovers


def test_missing_input_path(tmp_path, capsys):
    code, err = regroup_cli(tmp_path, capsys, input_path=tmp_path / "nope.parquet")
    assert_refused(code, err, tmp_path, "nope.parquet", "does not exist")


def test_unknown_format(tmp_path, capsys):
    p = tmp_path / "corpus.txt"
    p.write_text("hello\n")
    code, err = regroup_cli(tmp_path, capsys, input_path=p)
    assert_refused(code, err, tmp_path, "corpus.txt", "'.txt'", "parquet")


def test_directory_with_stray_file_names_it(tmp_path, capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    write_parquet(d / "a.parquet")
    (d / "notes.md").write_text("x")
    code, err = regroup_cli(tmp_path, capsys, input_path=d)
    assert_refused(code, err, tmp_path, "notes.md", "unknown input format")


@pytest.mark.parametrize("writer,name", [(write_parquet, "c.parquet"), (write_jsonl, "c.jsonl"),
                                         (write_csv, "c.csv")])
def test_text_column_missing(tmp_path, capsys, writer, name):
    p = writer(tmp_path / name)
    code, err = regroup_cli(tmp_path, capsys, "--text-column", "body", input_path=p)
    assert_refused(code, err, tmp_path, "'body'", name, "id, text, source")


def test_domain_column_missing(tmp_path, capsys):
    p = write_parquet(tmp_path / "c.parquet")
    code, err = regroup_cli(tmp_path, capsys, "--domain-column", "topic", input_path=p)
    assert_refused(code, err, tmp_path, "'topic'", "c.parquet")


def test_text_column_not_text(tmp_path, capsys):
    p = write_parquet(tmp_path / "c.parquet", [{"text": 1}, {"text": 2}])
    code, err = regroup_cli(tmp_path, capsys, input_path=p)
    assert_refused(code, err, tmp_path, "'text'", "int64")


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "dir"])
def test_empty_corpus(tmp_path, capsys, kind):
    if kind == "parquet":
        p = tmp_path / "e.parquet"
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), p)
    elif kind == "jsonl":
        p = tmp_path / "e.jsonl"
        p.write_text("\n\n")
    elif kind == "csv":
        p = tmp_path / "e.csv"
        p.write_text("text\n")
    else:
        p = tmp_path / "d"
        p.mkdir()
    code, err = regroup_cli(tmp_path, capsys, input_path=p)
    assert_refused(code, err, tmp_path, str(p.name))
    assert "empty" in err or "holds no files" in err


def test_malformed_jsonl_head(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    code, err = regroup_cli(tmp_path, capsys, input_path=p)
    assert_refused(code, err, tmp_path, "bad.jsonl:2", "JSON")


@pytest.mark.parametrize("k", ["0", "-3"])
def test_k_below_one(tmp_path, capsys, k):
    p = write_parquet(tmp_path / "c.parquet")
    code, err = regroup_cli(tmp_path, capsys, "--k", k, input_path=p)
    assert_refused(code, err, tmp_path, f"k must be at least 1, got {k}")


def test_k_not_an_integer(tmp_path, capsys):
    p = write_parquet(tmp_path / "c.parquet")
    code, err = regroup_cli(tmp_path, capsys, "--k", "many", input_path=p)
    assert_refused(code, err, tmp_path, "'many'", "k")


def test_k_above_rows_known_from_metadata(tmp_path):
    """Parquet row counts are known up front: k > rows fails before embedding."""
    import rnb_ray.regroup.regroup as rg

    p = write_parquet(tmp_path / "c.parquet")
    with pytest.raises(RnbError, match="k=9 is greater than the number of documents"):
        rg.regroup(RegroupConfig(output=str(tmp_path / "out"), input=str(p), k=9))
    assert not (tmp_path / "out").exists()


def test_model_path_missing(tmp_path, capsys):
    p = write_parquet(tmp_path / "c.parquet")
    code, err = regroup_cli(tmp_path, capsys, "--model", str(tmp_path / "no-model"), input_path=p)
    assert_refused(code, err, tmp_path, "no-model", "does not exist")


def test_model_dir_not_a_model(tmp_path, capsys):
    p = write_parquet(tmp_path / "c.parquet")
    (tmp_path / "empty-model").mkdir()
    code, err = regroup_cli(tmp_path, capsys, "--model", str(tmp_path / "empty-model"), input_path=p)
    assert_refused(code, err, tmp_path, "empty-model", "not a sentence-transformers model")


def test_unknown_hub_model_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = write_parquet(tmp_path / "c.parquet")
    code, err = regroup_cli(tmp_path, capsys, "--model", "nobody/no-such-model", input_path=p)
    assert_refused(code, err, tmp_path, "nobody/no-such-model", "offline")


def test_output_exists_and_not_empty(tmp_path, capsys):
    p = write_parquet(tmp_path / "c.parquet")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = regroup_cli(tmp_path, capsys, input_path=p)
    assert code == 2 and "not empty" in err and "--overwrite" in err and str(out) in err
    assert (out / "keep.txt").read_text() == "precious"
    # an empty directory is fine, and so is --overwrite
    validate(RegroupConfig(output=str(out), input=str(p), cache_dir=str(tmp_path / "c"), overwrite=True))
    (out / "keep.txt").unlink()
    validate(RegroupConfig(output=str(out), input=str(p), cache_dir=str(tmp_path / "c")))


def test_unknown_setting_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "regroup.yaml"
    cfg.write_text("k: 4\nnum_clusters: 3\n")
    code, err = run_cli(["regroup", "--config", str(cfg), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "num_clusters" in err


def test_unknown_metric(tmp_path, capsys):
    p = write_parquet(tmp_path / "c.parquet")
    code, err = regroup_cli(tmp_path, capsys, "--metric", "manhattan", input_path=p)
    assert_refused(code, err, tmp_path, "manhattan", "cosine")


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "half.parquet").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (tmp_path / "out" / "done.txt").read_text() == "ok"
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------------
# Readers (no Ray): the three formats give the same rows, row ids and UTF-8 handling.


def read_all(path, text_column="text", columns=None):
    corpus = open_corpus(path, text_column)
    tables = [t for f in corpus.fragments for t in read_fragment(corpus, f, columns)]
    return corpus, pa.concat_tables(tables)


@pytest.mark.parametrize("writer,name", [(write_parquet, "c.parquet"), (write_jsonl, "c.jsonl"),
                                         (write_csv, "c.csv")])
def test_formats_read_the_same(tmp_path, writer, name):
    corpus, t = read_all(writer(tmp_path / name))
    assert corpus.format == name.split(".")[1].replace("parquet", "parquet")
    assert t.column("text").to_pylist() == [r["text"] for r in ROWS]
    assert t.column("id").to_pylist() == [r["id"] for r in ROWS]
    np.testing.assert_array_equal(t.column(ROW_ID).to_numpy(), np.arange(4))
    assert not any(t.column(REPLACED).to_pylist())


def test_gzipped_jsonl_and_directory_row_ids(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    with gzip.open(d / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    write_jsonl(d / "b.jsonl", ROWS[:2])
    (d / "_SUCCESS").write_text("")  # marker files are ignored
    corpus, t = read_all(d)
    assert len(corpus.files) == 2
    ids = t.column(ROW_ID).to_numpy()
    expected = np.concatenate([np.arange(4), (1 << FILE_SHIFT) + np.arange(2)])
    np.testing.assert_array_equal(np.sort(ids), expected)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_invalid_utf8_is_replaced_and_flagged(tmp_path, fmt):
    bad = b"caf\xe9 au lait, \xff broken"
    if fmt == "parquet":
        p = tmp_path / "u.parquet"
        texts = pa.array([b"fine text", bad], pa.binary()).view(pa.string())  # invalid UTF-8 inside a string
        pq.write_table(pa.table({"text": texts}), p)
    elif fmt == "jsonl":
        p = tmp_path / "u.jsonl"
        p.write_bytes(b'{"text": "fine text"}\n{"text": "' + bad + b'"}\n')
    else:
        p = tmp_path / "u.csv"
        p.write_bytes(b"text\nfine text\n\"" + bad + b"\"\n")
    _, t = read_all(p)
    texts = t.column("text").to_pylist()
    assert texts[0] == "fine text"
    assert texts[1] == bad.decode("utf-8", errors="replace") and "\ufffd" in texts[1]
    assert t.column(REPLACED).to_pylist() == [False, True]
    t.column("text").validate(full=True)


def test_reserved_column_name_is_refused(tmp_path):
    p = write_parquet(tmp_path / "c.parquet", [{"text": "x", "__rnb_row_id": 1}])
    with pytest.raises(RnbError, match="reserved"):
        open_corpus(p)


def test_parquet_row_groups_become_fragments_with_global_row_ids(tmp_path, monkeypatch):
    import rnb_ray.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "_FRAGMENT_ROWS", 10)
    p = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(35)]}), p, row_group_size=10)
    corpus = open_corpus(p)
    assert len(corpus.fragments) == 4 and corpus.num_rows == 35
    t = pa.concat_tables([t for f in corpus.fragments for t in read_fragment(corpus, f)])
    np.testing.assert_array_equal(t.column(ROW_ID).to_numpy(), np.arange(35))
    assert t.column("text").to_pylist() == [f"doc {i}" for i in range(35)]


def test_no_input_means_the_embedded_sample_corpus(tmp_path):
    from rnb_ray.regroup.cache import resolve_input

    cfg = RegroupConfig(output=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    path, domain_column = resolve_input(cfg)
    assert domain_column == "source" and path.startswith(str(tmp_path / "cache"))
    corpus = validate(cfg)
    assert corpus.num_rows > 1000 and corpus.domain_column == "source"
    assert set(corpus.columns) == {"id", "text", "source"}
