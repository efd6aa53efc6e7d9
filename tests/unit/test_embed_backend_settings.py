"""Embedding backend settings: validation, cache keys, actor counts, package checks, derived-model records.

No Ray and no embedding here (the backends themselves run in tests/integration/test_embed_backends.py).
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnb_ray.cli import main
from rnb_ray.config import load_config, to_dict
from rnb_ray.corpus import open_corpus
from rnb_ray.errors import RnbError
from rnb_ray.pipeline import PipelineConfig, _drop_defaults
from rnb_ray.regroup import backends
from rnb_ray.regroup.cache import CACHE_VERSION, cache_key, embedder_args, gpu_args, pool_size
from rnb_ray.regroup.config import AssignConfig, RegroupConfig, check_embed_phases, phase_settings
from rnb_ray.regroup.embed import ModelRef, embedding_settings, resolve_model, settings_key
from rnb_ray.sweep.config import SweepConfig
from rnb_ray.sweep.tune import _check_resumable


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "c.parquet"
    pq.write_table(pa.table({"text": ["one document", "another document"]}), p)
    return open_corpus(p, "text")


# ------------------------------------------------------------------------------------------------ settings
def test_unknown_backend_is_one_line_naming_the_choices():
    with pytest.raises(RnbError) as e:
        load_config(RegroupConfig, None, {"output": "o", "embed_backend": "tensorrt"})
    msg = _one_line(e)
    assert "embed_backend" in msg and "'tensorrt'" in msg and "torch, onnx, onnx-int8, static" in msg


def test_unknown_backend_on_the_command_line_leaves_no_output(tmp_path, capsys):
    code = main(["regroup", "--output", str(tmp_path / "out"), "--embed-backend", "openvino"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "openvino" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings,match", [
    ({"embed_gpus": -1}, "embed_gpus must be >= 0"),
    ({"embed_gpus": 1, "embed_backend": "onnx-int8"}, "GPU embedding runs the torch backend"),
    ({"embed_gpus": 0.5, "embed_backend": "static"}, "GPU embedding runs the torch backend"),
    ({"embed_precision": "fp16"}, "fp16 needs a GPU"),
    ({"embed_precision": "bf16", "embed_backend": "onnx"}, "bf16 needs a GPU"),
    ({"embed_precision": "int4"}, "unknown value 'int4'"),
])
def test_bad_gpu_and_precision_settings(settings, match):
    with pytest.raises(RnbError, match=match) as e:
        load_config(RegroupConfig, None, {"output": "o", **settings})
    _one_line(e)


def test_gpu_settings_from_strings_as_the_cli_gives_them():
    cfg = load_config(RegroupConfig, None, {"output": "o", "embed_gpus": "0.25", "embed_precision": "bf16"})
    assert cfg.embed_gpus == 0.25 and cfg.embed_precision == "bf16" and cfg.embed_backend == "torch"
    a = load_config(AssignConfig, None, {"domains": "d", "input": "i", "output": "o", "embed_gpus": "1",
                                         "embed_precision": "fp16"})
    assert a.embed_backend is None  # the regroup's, read from domains.json
    with pytest.raises(RnbError, match="fp16 needs a GPU"):
        load_config(AssignConfig, None, {"domains": "d", "input": "i", "output": "o", "embed_precision": "fp16"})


def test_sweep_and_final_backends():
    # GPU settings go to the embedding that runs torch; the other one runs on CPU
    check_embed_phases("torch", "static", 1.0, "fp16")
    check_embed_phases("static", "torch", 0.5, "bf16")
    with pytest.raises(RnbError, match="GPU embedding runs the torch backend"):
        check_embed_phases("static", "onnx-int8", 1.0, "fp32")
    with pytest.raises(RnbError, match="needs a GPU"):
        check_embed_phases("torch", None, 0.0, "fp16")
    assert phase_settings("static", 1.0, "fp16") == {"embed_backend": "static", "embed_gpus": 0.0,
                                                     "embed_precision": "fp32"}
    assert phase_settings("torch", 1.0, "fp16") == {"embed_backend": "torch", "embed_gpus": 1.0,
                                                    "embed_precision": "fp16"}
    s = SweepConfig(input="x", output="y", embed_backend="torch", sweep_embed_backend="static")
    assert s.trial_backend == "static"
    assert dataclasses.replace(s, sweep_embed_backend=None).trial_backend == "torch"
    with pytest.raises(RnbError, match="GPU embedding"):
        SweepConfig(input="x", output="y", embed_backend="static", embed_gpus=1).validate()
    p = PipelineConfig(output="r", embed_backend="torch", sweep_embed_backend="onnx-int8")
    assert p.sweep_backend == "onnx-int8"


# ------------------------------------------------------------------------------------------------ cache keys
def test_torch_keys_are_the_keys_written_before_backends_existed(corpus):
    model = resolve_model(None)
    for max_len in (None, 16):
        legacy = {"version": CACHE_VERSION,
                  "corpus": {"format": corpus.format, "files": [list(f) for f in corpus.fingerprint]},
                  "text_column": corpus.text_column, **embedding_settings(model, max_len)}
        assert cache_key(corpus, model, max_len)[0] == settings_key(legacy)
        assert cache_key(corpus, model, max_len, "torch", "fp32")[0] == settings_key(legacy)


def test_backend_and_precision_change_the_key(corpus):
    model = resolve_model(None)
    keys = {cache_key(corpus, model, None, b, "fp32")[0] for b in backends.BACKENDS}
    keys |= {cache_key(corpus, model, None, "torch", p)[0] for p in ("fp16", "bf16")}
    assert len(keys) == len(backends.BACKENDS) + 2
    _, settings = cache_key(corpus, model, None, "static", "fp32")
    assert settings["backend"] == "static" and settings["backend_recipe"] == backends.RECIPES["static"]


def test_pipeline_and_sweep_hashes_leave_default_backends_out(tmp_path):
    """Runs and sweeps written before the embedding settings existed stay current."""
    assert _drop_defaults({"embed_backend": "torch", "embed_precision": "fp32", "sweep_embed_backend": None,
                           "k": [4]}) == {"k": [4]}
    assert _drop_defaults({"embed_backend": "static"}) == {"embed_backend": "static"}
    cfg = SweepConfig(input="c.parquet", output=str(tmp_path / "s"))
    out = tmp_path / "s"
    (out / "tune").mkdir(parents=True)
    old = {k: v for k, v in to_dict(cfg).items()
           if k not in ("embed_backend", "sweep_embed_backend", "embed_gpus", "embed_precision")}
    (out / "config.json").write_text(json.dumps(old))
    assert _check_resumable(out, cfg) is True
    with pytest.raises(RnbError, match="other settings \\(embed_backend\\)"):
        _check_resumable(out, dataclasses.replace(cfg, embed_backend="static"))


# ------------------------------------------------------------------------------------------------ actors
def test_actor_pool_size_and_gpu_request():
    def cfg(**kw):
        return RegroupConfig(output="o", **kw)

    assert pool_size(cfg(), {"CPU": 8}) == 8
    assert pool_size(cfg(embed_threads=2), {"CPU": 8}) == 4
    assert pool_size(cfg(embed_gpus=1), {"CPU": 8, "GPU": 2}) == 2
    assert pool_size(cfg(embed_gpus=0.5), {"CPU": 8, "GPU": 2}) == 4
    assert pool_size(cfg(embed_gpus=0.25), {"CPU": 2, "GPU": 4}) == 2  # CPUs bound it too
    assert pool_size(cfg(embed_gpus=1), {"CPU": 2}) == 1  # require_embedding_gpus then refuses it
    assert pool_size(cfg(embed_gpus=1, embed_actors=3), {"CPU": 8, "GPU": 1}) == 3
    assert gpu_args(cfg()) == {} and gpu_args(cfg(embed_gpus=0.5)) == {"num_gpus": 0.5}
    model = ModelRef("m", "/m")
    torch_args = embedder_args(model, backends.BackendModel("torch"), cfg(), "text", None)
    assert torch_args == {"model_path": "/m", "text_column": "text", "threads": 1, "batch_size": 128,
                          "max_seq_length": None}  # what the torch CPU pool was always given
    gpu = embedder_args(model, backends.BackendModel("torch"), cfg(embed_gpus=1, embed_precision="bf16"), "t", 8)
    assert gpu["device"] == "cuda" and gpu["precision"] == "bf16" and gpu["max_seq_length"] == 8
    static = embedder_args(model, backends.BackendModel("static", "/c/models/static-x"), cfg(), "t", None)
    assert static["backend"] == "static" and static["backend_path"] == "/c/models/static-x"


# ------------------------------------------------------------------------------------------------ packages
def test_missing_package_names_the_pip_command():
    backends.require_packages("torch")
    with pytest.raises(RnbError) as e:
        backends.require_packages("static", {"rnb_no_such_module": "no-such-package"})
    msg = _one_line(e)
    assert "no-such-package" in msg and "pip install 'rnb-ray[fast]'" in msg and "--embed-backend torch" in msg
    with pytest.raises(RnbError, match="unknown embedding backend"):
        backends.require_packages("tensorrt")


# ------------------------------------------------------------------------------------------------ records
def _fake_derived(directory, backend: str, source: dict, recipe: dict | None = None) -> None:
    directory.mkdir(parents=True)
    (directory / backends.META).write_text(json.dumps({
        "backend": backend, "recipe": backends.RECIPES[backend] if recipe is None else recipe, "source": source}))


def test_a_derived_model_is_only_used_with_its_own_model(tmp_path):
    model = resolve_model(None)
    mine = backends.source_record(model)
    assert mine["fingerprint"] == model.fingerprint() and len(mine["sha256"]) == 64
    ok = backends.artifact_dir(tmp_path, "static", model)
    _fake_derived(ok, "static", mine)
    bm = backends.verify(ok, "static", model)
    assert bm.path == str(ok) and bm.record()["source"] == mine
    # distilled from another model that has the same file names and sizes (same fingerprint), other content
    other = tmp_path / "other"
    _fake_derived(other, "static", {**mine, "name": "fine-tuned-minilm", "sha256": "0" * 64})
    with pytest.raises(RnbError, match="was made from model 'fine-tuned-minilm'") as e:
        backends.verify(other, "static", model)
    assert "delete that directory" in _one_line(e)
    with pytest.raises(RnbError, match="holds embeddings of a static model made from model 'fine-tuned-minilm'"):
        backends.check_made_from({"backend": "static", "source": {"name": "fine-tuned-minilm", "sha256": "0"}},
                                 model, where="cache/abc")
    backends.check_made_from({"backend": "static", "source": mine}, model, where="cache/abc")
    wrong_kind = tmp_path / "kind"
    _fake_derived(wrong_kind, "onnx", mine)
    with pytest.raises(RnbError, match="holds a onnx model, not static"):
        backends.verify(wrong_kind, "static", model)
    old_recipe = tmp_path / "recipe"
    _fake_derived(old_recipe, "static", mine, {**backends.RECIPES["static"], "pca_dims": 64})
    with pytest.raises(RnbError, match="another recipe"):
        backends.verify(old_recipe, "static", model)
    with pytest.raises(RnbError, match="missing or unreadable"):
        backends.verify(tmp_path / "nothing", "static", model)
    assert backends.backend_settings("torch", "fp32") == {}
    assert backends.BackendModel("torch").record() is None
