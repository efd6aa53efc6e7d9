"""The fast embedding backends end to end: real Ray, the real all-MiniLM-L6-v2 model exported to ONNX and
int8-quantised / distilled with model2vec, real parquet; and the GPU request on this CPU-only cluster.

Kept small for CI on 2 cores: one ~60-document corpus; the derived models are made once per session into
one cache (ONNX export + quantisation ≈ 15 s, static distillation ≈ 40–120 s: every vocabulary token through
the model).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rnb_ray.cli import main
from rnb_ray.errors import RnbError
from rnb_ray.regroup import backends
from rnb_ray.regroup.assign import assign
from rnb_ray.regroup.config import RegroupConfig
from rnb_ray.regroup.embed import embeddings_numpy, encode_by_length, load_model, resolve_model
from rnb_ray.regroup.regroup import embed_corpus

K = 3
DIM = {"onnx-int8": 384, "static": 256}


def read_output(out: Path) -> pa.Table:
    return pads.dataset(out / "data", format="parquet").to_table()


@pytest.fixture(scope="module")
def tiny(sample_corpus, tmp_path_factory) -> Path:
    """~60 real docstrings from every module, plus one empty text."""
    t = pq.read_table(sample_corpus)
    t = t.take(list(range(0, t.num_rows, max(1, t.num_rows // 60))))
    extra = pa.table({"id": ["x.empty"], "text": [""], "source": ["x"]}).cast(t.schema)
    path = tmp_path_factory.mktemp("tiny") / "tiny.parquet"
    pq.write_table(pa.concat_tables([t, extra]), path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def regrouped(ray_session, tiny, cache, tmp_path_factory):
    """`rnb regroup --embed-backend B` through the CLI entry point, for onnx-int8 and static."""
    root = tmp_path_factory.mktemp("out")
    outs = {}
    for backend in ("onnx-int8", "static"):
        out = root / backend
        code = main(["regroup", "--input", str(tiny), "--k", str(K), "--output", str(out), "--cache-dir", str(cache),
                     "--embed-backend", backend, "--domain-column", "source", "--seed", "1"])
        assert code == 0
        outs[backend] = out
    return outs


@pytest.mark.parametrize("backend", ["onnx-int8", "static"])
def test_regroup_with_a_fast_backend(regrouped, tiny, cache, backend, tmp_path):
    out = regrouped[backend]
    doc = json.loads((out / "domains.json").read_text())
    assert doc["embed_backend"] == backend and doc["embed_precision"] == "fp32" and doc["dim"] == DIM[backend]
    model = resolve_model(None)
    rec = doc["backend_model"]
    assert rec["backend"] == backend and rec["source"] == backends.source_record(model)
    assert Path(rec["path"]) == backends.artifact_dir(cache / "models", backend, model)
    assert json.loads((out / "config.json").read_text())["embed_backend"] == backend
    # every non-empty document exactly once, with its domain; sizes add up
    t = read_output(out)
    src = pq.read_table(tiny)
    ids = t.column("id").to_pylist()
    assert sorted(ids) == sorted(set(src.column("id").to_pylist()) - {"x.empty"})
    assert doc["n_dropped_empty"] == 1 and doc["n_documents"] == len(ids) == sum(doc["sizes"].values())
    assert set(t.column("domain").to_pylist()) == set(range(K))
    C = np.load(out / "centroids.npy")
    assert C.shape == (K, DIM[backend])
    # the cache entry records the backend; a second run reuses it, and the derived model is not made again
    emb_dir = Path(doc["embeddings"])
    meta = json.loads((emb_dir / "meta.json").read_text())
    assert meta["embed_backend"] == backend and meta["settings"]["backend"] == backend
    X = embeddings_numpy(pq.read_table(sorted(emb_dir.glob("part-*.parquet"))).column("embedding"))
    assert X.shape == (len(ids), DIM[backend])
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    made = (Path(rec["path"]) / backends.META).stat().st_mtime_ns
    again = embed_corpus(RegroupConfig(output=str(tmp_path / "o"), input=str(tiny), cache_dir=str(cache),
                                       embed_backend=backend, domain_column="source"))
    assert again.cache_hit and again.path == emb_dir and again.backend == backend
    assert (Path(rec["path"]) / backends.META).stat().st_mtime_ns == made
    torch_key = embed_corpus.__globals__["cache_key"](again.corpus, model, None)[0]
    assert torch_key != again.key  # the torch embeddings of the same corpus are another entry


def test_onnx_int8_vectors_are_close_to_torch(regrouped, tiny):
    doc = json.loads((regrouped["onnx-int8"] / "domains.json").read_text())
    emb_dir = Path(doc["embeddings"])
    cache = pq.read_table(sorted(emb_dir.glob("part-*.parquet")))
    X = embeddings_numpy(cache.column("embedding"))
    texts = pq.read_table(tiny).column("text").to_pylist()
    rows = cache.column("row_id").to_numpy()
    ref = encode_by_length(load_model(resolve_model(None).path, 1), [texts[i] for i in rows], 64)
    cos = (X * ref).sum(axis=1)
    assert cos.min() > 0.95, f"int8 vs torch cosine: min {cos.min():.3f}"


@pytest.mark.parametrize("backend", ["onnx-int8", "static"])
def test_assign_embeds_with_the_regroups_backend(regrouped, tiny, backend, tmp_path):
    out = regrouped[backend]
    result = assign(out / "domains.json", tiny, tmp_path / "a")
    assert result["embed_backend"] == backend
    got = read_output(tmp_path / "a")
    mine = dict(zip(read_output(out).column("id").to_pylist(), read_output(out).column("domain").to_pylist(),
                    strict=True))
    assert {i: d for i, d in zip(got.column("id").to_pylist(), got.column("domain").to_pylist(),
                                 strict=True)} == mine
    with pytest.raises(RnbError, match=f"--embed-backend torch, but the regroup .* embedded with {backend}"):
        assign(out / "domains.json", tiny, tmp_path / "b", embed_backend="torch")
    assert not (tmp_path / "b").exists()


def test_gpu_on_a_cluster_without_one_fails_at_once(ray_session, tiny, tmp_path, capsys, regrouped):
    code = main(["regroup", "--input", str(tiny), "--k", str(K), "--output", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "c"), "--embed-gpus", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "needs 1 GPUs but the Ray cluster has 0" in err[0] and "--embed-gpus" in err[0]
    assert not (tmp_path / "out").exists() and not any((tmp_path / "c").glob("*/meta.json"))
    code = main(["assign", "--domains", str(regrouped["static"] / "domains.json"), "--input", str(tiny),
                 "--output", str(tmp_path / "a"), "--embed-gpus", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "GPU embedding runs the torch backend" in err[0]
    assert not (tmp_path / "a").exists()


def _copy_model(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(resolve_model(None).path, dst)
    return dst


def test_static_model_of_another_model_is_refused(regrouped, tiny, cache, tmp_path, capsys):
    """A model with the same file names and sizes (so the same fingerprint) but other weights must not get the
    default model's static embeddings (cache hit) nor its static model (cache miss)."""
    other = _copy_model(tmp_path, "minilm-finetuned")
    weights = other / "model.safetensors"
    with weights.open("r+b") as f:  # other weights, same size
        f.seek(os.path.getsize(weights) // 2)
        f.write(b"\x01\x02\x03\x04" * 64)
    assert resolve_model(str(other)).fingerprint() == resolve_model(None).fingerprint()
    for corpus in (tiny, tmp_path / "subset.parquet"):  # the cached corpus (hit), then a new one (miss)
        if corpus != tiny:
            pq.write_table(pq.read_table(tiny).slice(0, 20), corpus)
        code = main(["regroup", "--input", str(corpus), "--k", str(K), "--output", str(tmp_path / "out"),
                     "--cache-dir", str(cache), "--embed-backend", "static", "--model", str(other)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "made from model 'all-MiniLM-L6-v2'" in err[0], err
        assert not (tmp_path / "out").exists()


def test_onnx_export_failure_is_one_line_naming_the_model(ray_session, tiny, tmp_path, capsys):
    broken = _copy_model(tmp_path, "broken-model")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    code = main(["regroup", "--input", str(tiny), "--k", str(K), "--output", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "c"), "--embed-backend", "onnx", "--model", str(broken)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"ONNX export of model '{broken}'" in err[0] and "failed" in err[0] and "--embed-backend torch" in err[0]
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "c" / "models").glob("onnx-*"))  # no half-made export left behind
