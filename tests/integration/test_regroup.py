"""Regroup end to end on real Ray, the real all-MiniLM-L6-v2 model and real parquet/jsonl/csv files.

Kept small for CI on 2 cores: one ~320-document regroup (shared by most tests through a module fixture),
and tiny corpora for the cache, bad-input and CLI-subprocess checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score as sk_silhouette

from rnb_ray.cli import main
from rnb_ray.config import load_config
from rnb_ray.errors import RnbError
from rnb_ray.regroup import kmeans as km
from rnb_ray.regroup.assign import assign
from rnb_ray.regroup.clustering import fit_array
from rnb_ray.regroup.config import RegroupConfig
from rnb_ray.regroup.distributed import fit_kmeans
from rnb_ray.regroup.embed import embeddings_numpy
from rnb_ray.regroup.regroup import embed_corpus, regroup
from rnb_ray.regroup.silhouette import silhouette_score

REPO = Path(__file__).resolve().parents[2]
K = 6
BAD_UTF8 = b"Decode me: caf\xe9 \xff done. This docstring has bytes that are not UTF-8."


def read_output(out: Path) -> pa.Table:
    return pads.dataset(out / "data", format="parquet").to_table()


@pytest.fixture(scope="module")
def small_corpus(sample_corpus, tmp_path_factory) -> Path:
    """~310 real docstrings + 2 empty + 1 whitespace-only + 1 with invalid UTF-8 bytes."""
    t = pq.read_table(sample_corpus)
    t = t.take(list(range(0, t.num_rows, 7)))
    extra_text = pa.array([b"", b"   \n\t ", BAD_UTF8, b""], pa.binary()).view(pa.string())
    extra = pa.table({"id": ["x.empty1", "x.blank", "x.utf8", "x.empty2"], "text": extra_text,
                      "source": ["x", "x", "x", "x"]})
    path = tmp_path_factory.mktemp("small") / "small.parquet"
    pq.write_table(pa.concat_tables([t, extra]), path, row_group_size=128)
    return path


@pytest.fixture(scope="module")
def regrouped(ray_session, small_corpus, tmp_path_factory):
    """`rnb regroup` through the CLI entry point, in-process (shares the test Ray session)."""
    root = tmp_path_factory.mktemp("regroup")
    out = root / "out"
    code = main(["regroup", "--input", str(small_corpus), "--k", str(K), "--output", str(out),
                 "--domain-column", "source", "--cache-dir", str(root / "cache"), "--seed", "3",
                 "--embed-batch-size", "64"])
    assert code == 0
    return out


def test_output_layout_and_domains_json(regrouped, small_corpus):
    out = regrouped
    assert sorted(p.name for p in out.iterdir()) == ["centroids.npy", "config.json", "data", "domains.json"]
    doc = json.loads((out / "domains.json").read_text())
    for key in ("k", "model", "metric", "dim", "n_documents", "n_dropped_empty", "n_replaced_utf8", "sizes",
                "centroids", "inertia", "iterations", "converged", "text_column", "domain_column", "domains",
                "crosstab", "embeddings"):
        assert key in doc, key
    n_input = pq.read_metadata(small_corpus).num_rows
    assert doc["k"] == K and doc["dim"] == 384 and doc["metric"] == "cosine"
    assert doc["n_dropped_empty"] == 3  # "", whitespace, "" — dropped and counted
    assert doc["n_replaced_utf8"] == 1
    assert doc["n_documents"] == n_input - 3 == sum(doc["sizes"].values())
    assert [d["id"] for d in doc["domains"]] == list(range(K))
    assert all(d["size"] == doc["sizes"][str(d["id"])] > 0 for d in doc["domains"])
    C = np.load(out / "centroids.npy")
    assert C.dtype == np.float32 and C.shape == (K, 384)
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)
    assert Path(doc["embeddings"]).is_dir()
    cfg = load_config(RegroupConfig, out / "config.json")
    assert cfg.k == K and cfg.seed == 3 and cfg.domain_column == "source"
    # crosstab: original domain × new domain, adds up to the sizes
    totals = np.zeros(K, dtype=int)
    for row in doc["crosstab"].values():
        for d, n in row.items():
            totals[int(d)] += n
    assert totals.tolist() == [doc["sizes"][str(d)] for d in range(K)]
    assert {"json", "socket", "x"} <= set(doc["crosstab"])


def test_every_document_once_with_its_domain(regrouped, small_corpus):
    t = read_output(regrouped)
    src = pq.read_table(small_corpus)
    assert t.schema.field("domain").type == pa.int64()
    assert set(t.column_names) == {"id", "text", "source", "domain"}
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    expected = set(src.column("id").to_pylist()) - {"x.empty1", "x.blank", "x.empty2"}
    assert set(ids) == expected
    # text and source travel unchanged with their id; the bad bytes were replaced, not dropped
    by_id = dict(zip(src.column("id").to_pylist(), src.column("source").to_pylist(), strict=True))
    assert all(by_id[i] == s for i, s in zip(ids, t.column("source").to_pylist(), strict=True))
    utf8 = t.filter(pa.compute.equal(t.column("id"), "x.utf8")).column("text")[0].as_py()
    assert utf8 == BAD_UTF8.decode("utf-8", errors="replace")
    # the domain-<id> directory agrees with the column in every file
    for f in (regrouped / "data").rglob("*.parquet"):
        assert f.parent.name.startswith("domain-")
        d = int(f.parent.name.split("-")[1])
        assert set(pq.read_table(f).column("domain").to_pylist()) == {d}
    sizes = json.loads((regrouped / "domains.json").read_text())["sizes"]
    counts = np.bincount(t.column("domain").to_numpy(), minlength=K)
    assert counts.tolist() == [sizes[str(d)] for d in range(K)]


def test_representatives_are_nearest_real_documents_of_their_domain(regrouped):
    doc = json.loads((regrouped / "domains.json").read_text())
    t = read_output(regrouped)
    texts = t.column("text").to_pylist()
    domains = t.column("domain").to_pylist()
    for d in doc["domains"]:
        reps = d["representatives"]
        assert len(reps) == min(3, d["size"])
        mine = {x for x, y in zip(texts, domains, strict=True) if y == d["id"]}
        assert all(r in mine for r in reps), f"domain {d['id']} lists texts that are not its documents"
    # and they are the nearest: re-embed nothing, use the cache and the centroids
    emb_dir = Path(doc["embeddings"])
    cache = pq.read_table(sorted(emb_dir.glob("part-*.parquet")))
    X = embeddings_numpy(cache.column("embedding"))
    C = np.load(regrouped / "centroids.npy")
    labels, dist = km.assign(X, C, "cosine")
    np.testing.assert_array_equal(np.bincount(labels, minlength=K), [d["size"] for d in doc["domains"]])
    assert doc["inertia"] == pytest.approx(float(dist.sum()), rel=1e-4)


def test_embeddings_are_normalised_float32_in_input_order(regrouped, small_corpus):
    doc = json.loads((regrouped / "domains.json").read_text())
    emb_dir = Path(doc["embeddings"])
    meta = json.loads((emb_dir / "meta.json").read_text())
    cache = pq.read_table(sorted(emb_dir.glob("part-*.parquet")))
    assert cache.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    ids = cache.column("row_id").to_numpy()
    assert (np.diff(ids) > 0).all() and meta["n"] == len(ids) == doc["n_documents"]
    X = embeddings_numpy(cache.column("embedding"))
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    # row ids are input positions: the empty rows (positions of x.empty1, x.blank, x.empty2) are missing
    src_ids = pq.read_table(small_corpus).column("id").to_pylist()
    missing = sorted(set(range(len(src_ids))) - set(ids.tolist()))
    assert [src_ids[i] for i in missing] == ["x.empty1", "x.blank", "x.empty2"]


def test_distributed_lloyd_matches_sklearn(regrouped, ray_session, tmp_path):
    """Same embeddings, same initial centroids: same labels, inertia within 1e-4 (euclidean Lloyd)."""
    cfg = load_config(RegroupConfig, regrouped / "config.json", {"output": str(tmp_path / "o")})
    emb = embed_corpus(cfg)
    assert emb.cache_hit
    cache = pq.read_table(emb.files())
    X = embeddings_numpy(cache.column("embedding"))
    init = X[np.random.default_rng(0).choice(len(X), 8, replace=False)].astype(np.float64)
    ref = KMeans(8, init=init.astype(np.float32), n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(X)
    for engine in ("actors", "data"):
        ours = fit_kmeans(emb.dataset(), 8, metric="euclidean", init=init, max_iter=300, tol=0.0, engine=engine,
                          num_shards=2)
        labels, _ = km.assign(X, ours.centroids.astype(np.float64), "euclidean")
        np.testing.assert_array_equal(labels, ref.labels_)
        assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)
        assert ours.converged and ours.sizes.tolist() == np.bincount(ref.labels_, minlength=8).tolist()
    # an empty cluster (a centroid far from every point) is re-seeded as scikit-learn does
    init_far = init.copy()
    init_far[5] = 10.0
    ours_far = fit_kmeans(emb.dataset(), 8, metric="euclidean", init=init_far, max_iter=300, tol=0.0, num_shards=2)
    ref_far = KMeans(8, init=init_far.astype(np.float32), n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(X)
    assert ours_far.reseeded >= 1 and (ours_far.sizes > 0).all()
    np.testing.assert_array_equal(km.assign(X, ours_far.centroids.astype(np.float64), "euclidean")[0], ref_far.labels_)
    assert ours_far.inertia == pytest.approx(ref_far.inertia_, rel=1e-4)
    # cosine (spherical) k-means against the in-memory reference, and seeded runs are reproducible
    cos = fit_kmeans(emb.dataset(), 5, metric="cosine", init=init[:5], max_iter=300, tol=0.0, num_shards=2)
    ref_cos = fit_array(X, 5, metric="cosine", init=init[:5], max_iter=300, tol=0.0)
    np.testing.assert_array_equal(km.assign(X, cos.centroids.astype(np.float64), "cosine")[0], ref_cos.labels)
    assert cos.inertia == pytest.approx(ref_cos.inertia, rel=1e-4)
    a = fit_kmeans(emb.dataset(), 5, metric="cosine", seed=11, sample_size=100, num_shards=2)
    b = fit_kmeans(emb.dataset(), 5, metric="cosine", seed=11, sample_size=100, num_shards=2)
    np.testing.assert_array_equal(a.centroids, b.centroids)  # same seed, same split: bitwise the same
    c = fit_kmeans(emb.dataset(), 5, metric="cosine", seed=11, sample_size=100, num_shards=1)
    np.testing.assert_allclose(a.centroids, c.centroids, atol=1e-5)  # another split: same up to rounding
    np.testing.assert_array_equal(a.sizes, c.sizes)
    assert a.converged and a.history[-1]["shift"] <= a.history[0]["shift"]
    # silhouette on the whole set (sample ≥ n) equals scikit-learn's
    s = silhouette_score(emb.dataset(), cos.centroids, metric="cosine", sample_size=10_000)
    assert s == pytest.approx(sk_silhouette(X.astype(np.float64), ref_cos.labels, metric="cosine"), abs=1e-6)


def test_large_k_distributed_matches_in_process(regrouped, ray_session, tmp_path):
    """k = 128 on ~310 documents (k in the hundreds relative to the data): both engines give fit_array's fit."""
    cfg = load_config(RegroupConfig, regrouped / "config.json", {"output": str(tmp_path / "o")})
    emb = embed_corpus(cfg)
    X = embeddings_numpy(pq.read_table(emb.files()).column("embedding"))
    ref = fit_array(X, 128, metric="cosine", seed=5, max_iter=30)
    for engine in ("actors", "data"):
        ours = fit_kmeans(emb.dataset(), 128, metric="cosine", seed=5, max_iter=30, engine=engine, num_shards=2,
                          device="auto")  # no GPU in this session: auto is cpu
        np.testing.assert_array_equal(km.assign(X, ours.centroids.astype(np.float64), "cosine")[0], ref.labels)
        assert ours.iterations == ref.iterations and ours.reseeded == ref.reseeded
        assert ours.inertia == pytest.approx(ref.inertia, rel=1e-4)
        assert (ours.sizes > 0).all() and ours.sizes.sum() == len(X)


def test_kmeans_on_cuda_without_a_gpu_is_refused_before_embedding(ray_session, tmp_path, capsys):
    p = tmp_path / "docs.csv"
    p.write_text("id,text\n1,one real document\n2,another real document\n3,a third one\n")
    code = main(["regroup", "--input", str(p), "--k", "2", "--output", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "c"), "--kmeans-device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "--kmeans-device cuda" in err and "GPU" in err and "--kmeans-device cpu" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()  # nothing embedded, no output


def test_assign_routes_documents_to_the_same_domains(regrouped, ray_session, small_corpus, tmp_path):
    src = pq.read_table(small_corpus)
    subset = src.take(list(range(0, src.num_rows, 5)))  # includes x.blank? positions differ; fine either way
    p = tmp_path / "new.jsonl"
    p.write_text("".join(json.dumps({"doc": r["id"], "body": r["text"]}) + "\n" for r in subset.to_pylist()))
    out = tmp_path / "assigned"
    result = assign(regrouped / "domains.json", p, out, text_column="body")
    t = read_output(out)
    assert set(t.column_names) == {"doc", "body", "domain"}
    assert result["n_documents"] == t.num_rows
    assert json.loads((out / "assignment.json").read_text())["sizes"] == result["sizes"]
    regroup_domain = dict(zip(read_output(regrouped).column("id").to_pylist(),
                              read_output(regrouped).column("domain").to_pylist(), strict=True))
    got = dict(zip(t.column("doc").to_pylist(), t.column("domain").to_pylist(), strict=True))
    same = sum(regroup_domain[i] == d for i, d in got.items())
    assert same == len(got), f"{len(got) - same} of {len(got)} documents changed domain"
    assert {d.name for d in (out / "data").iterdir()} == {f"domain-{d}" for d in set(got.values())}


def test_every_reader_reads_the_output(regrouped, ray_session, tmp_path):
    """pandas, polars, DuckDB, Hugging Face datasets, pyarrow (hive on) and Ray Data all read OUT/data with
    one int64 `domain` column that agrees with domains.json (issue 14: pandas used to refuse it)."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    data = regrouped / "data"
    sizes = json.loads((regrouped / "domains.json").read_text())["sizes"]
    want = {int(d): n for d, n in sizes.items() if n}

    def counts(values) -> dict[int, int]:
        u, c = np.unique(np.asarray(values), return_counts=True)
        return dict(zip(u.tolist(), c.tolist(), strict=True))

    df = pd.read_parquet(data)
    assert str(df["domain"].dtype) == "int64" and counts(df["domain"]) == want
    for frame in (pl.read_parquet(f"{data}/**/*.parquet", hive_partitioning=True),
                  pl.scan_parquet(f"{data}/**/*.parquet", hive_partitioning=True).collect()):
        assert frame.schema["domain"] == pl.Int64 and counts(frame["domain"].to_numpy()) == want
    rows = duckdb.sql(f"SELECT domain, count(*) FROM read_parquet('{data}/**/*.parquet', hive_partitioning=true) "
                      "GROUP BY domain").fetchall()
    assert dict(rows) == want
    assert duckdb.sql(f"SELECT typeof(domain) FROM read_parquet('{data}/**/*.parquet', hive_partitioning=true) "
                      "LIMIT 1").fetchall() == [("BIGINT",)]
    hf = datasets.load_dataset("parquet", data_dir=str(data), split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.features["domain"].dtype == "int64" and counts(hf["domain"]) == want
    t = pads.dataset(data, format="parquet", partitioning="hive").to_table()
    assert t.schema.field("domain").type == pa.int64() and counts(t.column("domain").to_numpy()) == want
    assert pq.read_table(data).schema.field("domain").type == pa.int64()
    ds = ray_session.data.read_parquet(str(data))
    assert ds.schema().base_schema.field("domain").type == pa.int64()
    assert counts(ds.to_pandas()["domain"]) == want


def test_cache_hit_and_invalidation(ray_session, sample_corpus, tmp_path):
    """Second run reuses the embeddings (nothing re-embedded); a changed setting or file misses."""
    rows = pq.read_table(sample_corpus).slice(0, 40).to_pylist()
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    cfg = RegroupConfig(output=str(tmp_path / "o1"), input=str(corpus), k=3, cache_dir=str(cache))
    first = embed_corpus(cfg)
    assert not first.cache_hit and first.n == 40
    stamp = {f: os.stat(f).st_mtime_ns for f in first.files()}
    second = embed_corpus(RegroupConfig(output=str(tmp_path / "o2"), input=str(corpus), k=5, cache_dir=str(cache),
                                        embed_batch_size=7, metric="euclidean"))
    assert second.cache_hit and second.path == first.path
    assert {f: os.stat(f).st_mtime_ns for f in second.files()} == stamp
    changed = embed_corpus(RegroupConfig(output=str(tmp_path / "o3"), input=str(corpus), k=3, cache_dir=str(cache),
                                         max_seq_length=16))
    assert not changed.cache_hit and changed.path != first.path
    X1 = embeddings_numpy(pq.read_table(first.files()).column("embedding"))
    X2 = embeddings_numpy(pq.read_table(changed.files()).column("embedding"))
    assert not np.allclose(X1, X2)  # truncation to 16 tokens really changed the embeddings
    assert len(list(cache.iterdir())) == 2
    # the regroup run on the cached embeddings, as a real subprocess through jobs/regroup.py joining
    # this test's Ray cluster (as `ray job submit` would): cache hit, full output
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = tmp_path / "o4"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "regroup.py"), "--input", str(corpus), "--k", "3",
                           "--output", str(out), "--cache-dir", str(cache), "--kmeans-engine", "data"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["cache_hit"] is True and summary["n_documents"] == 40
    assert "k-means iteration 1:" in proc.stderr
    assert read_output(out).num_rows == 40


def test_all_texts_empty_is_refused(ray_session, tmp_path):
    p = tmp_path / "blank.csv"
    p.write_text("id,text\n1,\n2,   \n3,\n")
    with pytest.raises(RnbError, match="every text in column 'text'.*empty") as e:
        regroup(RegroupConfig(output=str(tmp_path / "out"), input=str(p), k=1, cache_dir=str(tmp_path / "c")))
    assert "blank.csv" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_k_above_non_empty_documents_is_refused(ray_session, tmp_path, capsys):
    p = tmp_path / "few.csv"
    p.write_text("id,text\n1,one real document\n2,\n3,another real document\n4, \n")
    code = main(["regroup", "--input", str(p), "--k", "3", "--output", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "k=3 is greater than the number of non-empty documents (2)" in err and "few.csv" in err
    assert not (tmp_path / "out").exists()


def test_bad_row_deep_in_a_file_is_a_clear_error(ray_session, tmp_path):
    """Only a file's head is checked up front; a malformed line later fails the read task, and the
    error still names the file and leaves no output."""
    p = tmp_path / "late.jsonl"
    good = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(60_000))  # > 1 MB head
    p.write_text(good + '{"text": broken\n')
    with pytest.raises(RnbError, match="late.jsonl") as e:
        regroup(RegroupConfig(output=str(tmp_path / "out"), input=str(p), k=2, cache_dir=str(tmp_path / "c")))
    assert type(e.value) is RnbError, "the task's error reaches the user unwrapped (no Ray traceback text)"
    assert e.value.where == f"{p}:60001"
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "c").iterdir()) == []  # no half-written cache entry either
