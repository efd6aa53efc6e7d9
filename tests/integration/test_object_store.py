"""Regroup, assign and the training-data plan on s3:// URIs, against a real local S3 server (moto).

The server speaks the S3 REST API over HTTP on a free port; rnb-ray reaches it through pyarrow's
S3FileSystem exactly as it would reach AWS or MinIO (endpoint from ``AWS_ENDPOINT_URL``). The shared Ray
session was started before the endpoint variables were set, so its workers do not have them: they can
only reach the store through the filesystem object rnb-ray pickles into their tasks.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rnb_ray.cli import main
from rnb_ray.errors import RnbError
from rnb_ray.regroup.assign import assign
from rnb_ray.storage import list_files

BUCKET = "rnb-test"


@pytest.fixture(scope="module")
def s3(ray_session, local_s3):
    """The local S3 server with its variables set after Ray started (workers must not inherit them)."""
    return local_s3


def _objects(fs: pafs.S3FileSystem, prefix: str = BUCKET) -> list[str]:
    return [i.path for i in list_files(fs, prefix)]


@pytest.fixture(scope="module")
def s3_corpus(s3, sample_corpus) -> pa.Table:
    """~150 real docstrings in two parquet objects under s3://rnb-test/corpus/ (+ a _SUCCESS marker)."""
    t = pq.read_table(sample_corpus)
    t = t.take(list(range(0, t.num_rows, 15)))
    half = t.num_rows // 2
    for i, part in enumerate((t.slice(0, half), t.slice(half))):
        pq.write_table(part, f"{BUCKET}/corpus/part-{i}.parquet", filesystem=s3, row_group_size=64)
    with s3.open_output_stream(f"{BUCKET}/corpus/_SUCCESS") as f:
        f.write(b"")
    return t


@pytest.fixture(scope="module")
def regrouped_s3(s3, s3_corpus, tmp_path_factory) -> str:
    out = f"s3://{BUCKET}/out/regrouped"
    code = main(["regroup", "--input", f"s3://{BUCKET}/corpus/", "--output", out, "--k", "3",
                 "--cache-dir", str(tmp_path_factory.mktemp("cache")), "--seed", "1", "--embed-batch-size", "64"])
    assert code == 0
    return out


def test_ray_workers_do_not_have_the_endpoint_variables(ray_session, s3):
    """The premise of these tests: workers reach the store only through the pickled filesystem."""
    @ray_session.remote(num_cpus=0)
    def worker_env() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert ray_session.get(worker_env.remote()) is None


def test_regroup_reads_and_writes_s3(s3, s3_corpus, regrouped_s3):
    root = f"{BUCKET}/out/regrouped"
    names = {p[len(root) + 1:].split("/")[0] for p in _objects(s3, root)}
    assert names == {"centroids.npy", "config.json", "data", "domains.json"}
    # nothing left beside it: the temporary prefix was deleted after the copy
    assert [p for p in _objects(s3, f"{BUCKET}/out") if not p.startswith(root + "/")] == []
    table = pads.dataset(f"{root}/data", filesystem=s3, format="parquet").to_table()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(s3_corpus.column("id").to_pylist())  # every document exactly once
    assert len(set(ids)) == len(ids)
    assert table.schema.field("domain").type == pa.int64()
    doc = json.loads(s3.open_input_stream(f"{root}/domains.json").read())
    assert doc["k"] == 3 and doc["input"] == f"s3://{BUCKET}/corpus/"
    sizes = np.bincount(table.column("domain").to_numpy(), minlength=3)
    assert [doc["sizes"][str(d)] for d in range(3)] == sizes.tolist() and sizes.min() > 0
    # every part sits in the directory of its domain
    for frag in pads.dataset(f"{root}/data", filesystem=s3, format="parquet").get_fragments():
        d = int(frag.path.split("domain-")[1].split("/")[0])
        assert set(frag.to_table(columns=["domain"]).column(0).to_pylist()) == {d}
    C = np.load(s3.open_input_file(f"{root}/centroids.npy"))
    assert C.shape == (3, doc["dim"]) and np.allclose(np.linalg.norm(C, axis=1), 1, atol=1e-5)


def test_assign_from_s3_domains_to_s3(ray_session, s3, regrouped_s3):
    """Documents of the corpus get the same domain from assign as from regroup (same model, same centroids)."""
    out = f"s3://{BUCKET}/out/assigned"
    result = assign(f"{regrouped_s3}/domains.json", f"s3://{BUCKET}/corpus/part-1.parquet", out,
                    embed_batch_size=64, embed_actors=1)
    got = pads.dataset(f"{BUCKET}/out/assigned/data", filesystem=s3, format="parquet").to_table()
    want = pads.dataset(f"{BUCKET}/out/regrouped/data", filesystem=s3, format="parquet").to_table()
    want_by_id = dict(zip(want.column("id").to_pylist(), want.column("domain").to_pylist(), strict=True))
    assert got.num_rows == result["n_documents"] == pq.read_metadata(f"{BUCKET}/corpus/part-1.parquet",
                                                                      filesystem=s3).num_rows
    agree = np.mean([want_by_id[i] == d for i, d in zip(got.column("id").to_pylist(),
                                                         got.column("domain").to_pylist(), strict=True)])
    assert agree > 0.99
    assert s3.get_file_info(f"{BUCKET}/out/assigned/assignment.json").type == pafs.FileType.File


def test_training_plan_reads_the_s3_regroup_output(s3, regrouped_s3, tmp_path):
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.plan import SourceReader, prepare_plan, worker_streams

    plan = prepare_plan(TrainConfig(data=regrouped_s3, output=str(tmp_path / "run")))
    doc = json.loads(s3.open_input_stream(f"{BUCKET}/out/regrouped/domains.json").read())
    assert plan.domains == ["0", "1", "2"]
    assert int(plan.sizes.sum() + plan.eval_sizes.sum()) == doc["n_documents"]
    assert plan.domain_counts_from == {"parquet statistics": len(plan.sources)}  # footers only, no data read
    reader = SourceReader(plan)
    key, rows = plan.eval[0][0]
    texts = reader.rows(key, rows[:3])
    assert len(texts) == len(rows[:3]) and all(isinstance(t, str) and t for t in texts)
    stream = worker_streams(plan, 0, 1, 0, reader, buffer=4)[0]
    assert all(isinstance(stream.next(), str) for _ in range(6))  # streamed from the objects
    # a separate evaluation set given as a URI (here a single object of the regrouped data)
    part = next(p for p in _objects(s3, f"{BUCKET}/out/regrouped/data/domain-1"))
    with_eval = prepare_plan(TrainConfig(data=regrouped_s3, eval_data=f"s3://{part}", output=str(tmp_path / "r")))
    assert with_eval.q_source == "eval_data" and with_eval.q.tolist() == [0.0, 1.0, 0.0]
    assert with_eval.eval_sizes.tolist() == [0, pq.read_metadata(part, filesystem=s3).num_rows, 0]


def test_train_accepts_data_uris_and_refuses_an_output_uri(regrouped_s3):
    from rnb_ray.balance.config import TrainConfig

    TrainConfig(data=regrouped_s3, eval_data=regrouped_s3, output="runs/x").validate()  # URIs pass the local checks
    with pytest.raises(RnbError, match="use a local or shared path for --output"):
        TrainConfig(data=regrouped_s3, output=f"s3://{BUCKET}/runs/x").validate()


@pytest.mark.parametrize("uri,expect", [
    (f"s3://no-such-bucket-{os.getpid()}/corpus/", "bucket 'no-such-bucket"),
    (f"s3://{BUCKET}/no/such/prefix/", "does not exist"),
])
def test_missing_input_is_a_clear_error_before_ray_work(s3, s3_corpus, tmp_path, capsys, uri, expect):
    before = _objects(s3)
    code = main(["regroup", "--input", uri, "--output", f"s3://{BUCKET}/out/never", "--k", "2",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and expect in err and uri.rstrip("/") in err
    assert _objects(s3) == before
    assert not (tmp_path / "cache").exists()


def test_bad_outputs_are_refused_before_ray_work(s3, s3_corpus, regrouped_s3, tmp_path, capsys):
    before = _objects(s3)
    args = ["regroup", "--input", f"s3://{BUCKET}/corpus/", "--k", "2", "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--output", f"s3://no-such-bucket-{os.getpid()}/x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--output", regrouped_s3]) == 2  # exists, not empty, no --overwrite
    assert f"{regrouped_s3} exists and is not empty" in capsys.readouterr().err
    assert main([*args[:-2], "--output", f"s3://{BUCKET}/out/other"]) == 2  # no --cache-dir for a URI output
    assert "--cache-dir" in capsys.readouterr().err
    assert _objects(s3) == before
