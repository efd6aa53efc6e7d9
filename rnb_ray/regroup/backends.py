"""Embedding backends: the model as it is, exported to ONNX Runtime, or distilled into a static embedder.

``--embed-backend`` picks how the embedding actors turn text into vectors:

* ``torch``     — the sentence-transformers model itself (the default; nothing to prepare);
* ``onnx``      — the same model (every module: transformer, pooling, normalisation) exported with
                  ``torch.onnx.export`` and run by ONNX Runtime; same vectors up to float rounding;
* ``onnx-int8`` — that export with int8 dynamic quantisation of its weights
                  (``onnxruntime.quantization.quantize_dynamic``): about a quarter of the size, faster on
                  CPU, vectors close to torch's (cosine ≈ 0.99, see the README's measurements);
* ``static``    — a static embedder distilled from the model with model2vec (``model2vec.distill``: every
                  vocabulary token through the model, PCA to 256 dimensions, Zipf weighting); a document is
                  the mean of its tokens' vectors, no transformer at all: orders of magnitude faster, coarser.

The derived models are made **once, locally, on the driver** before the actor pool starts (``prepare``), and
kept in ``<cache_dir>/models/<backend>-<model fingerprint>/`` with ``rnb-backend.json``, which records the
source model (name, fingerprint, sha256 of its files) and the recipe. Nothing is downloaded. A derived model
is only used with the model it was made from: ``verify`` refuses one whose recorded source differs (for
example a directory copied from another cache, or a model changed in place without changing its file sizes,
which ``ModelRef.fingerprint`` alone would not notice).

Why not sentence-transformers' own ``backend="onnx"``: it goes through optimum-onnx, whose releases require
transformers < 4.58, and this project runs transformers 5. The export here is the same graph without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rnb_ray.atomic import atomic_dir
from rnb_ray.errors import RnbError
from rnb_ray.regroup.embed import ModelRef

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8", "static")
META = "rnb-backend.json"
ONNX_FILE = "model.onnx"
PIP_FAST = "pip install 'rnb-ray[fast]'"
# What each backend needs beyond the core install (import name → pip name).
PACKAGES: dict[str, dict[str, str]] = {
    "torch": {},
    "onnx": {"onnxruntime": "onnxruntime", "onnx": "onnx"},
    "onnx-int8": {"onnxruntime": "onnxruntime", "onnx": "onnx"},
    "static": {"model2vec": "model2vec", "skeletoken": "skeletoken"},
}
# The recipes: everything that decides a derived model's vectors (also in the embedding cache key).
ONNX_OPSET = 17
RECIPES: dict[str, dict[str, Any]] = {
    "torch": {},
    "onnx": {"exporter": "torch.onnx.export (TorchScript)", "opset": ONNX_OPSET, "version": 1},
    "onnx-int8": {"exporter": "torch.onnx.export (TorchScript)", "opset": ONNX_OPSET, "version": 1,
                  "quantization": "onnxruntime quantize_dynamic", "weight_type": "QInt8", "per_channel": True},
    "static": {"distiller": "model2vec.distill", "pca_dims": 256, "sif_coefficient": 1e-4, "pooling": "mean",
               "token_remove_pattern": r"\[unused\d+\]", "dtype": "float32", "version": 1},
}


@dataclass(frozen=True)
class BackendModel:
    """What the embedding actors load: the backend and, for a derived model, its directory."""

    backend: str
    path: str | None = None  # the derived model's directory (None for torch)
    source: dict[str, Any] = field(default_factory=dict)  # recorded source model: name, fingerprint, sha256
    recipe: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any] | None:
        """As written into meta.json / domains.json (None for torch)."""
        if self.backend == "torch":
            return None
        return {"backend": self.backend, "path": self.path, "source": self.source, "recipe": self.recipe}


def backend_settings(backend: str, precision: str) -> dict[str, Any]:
    """The embedding cache key's share of the backend: nothing for torch in fp32, so that the keys of caches
    written before backends existed stay the same; the backend and its recipe otherwise."""
    out: dict[str, Any] = {}
    if backend != "torch":
        out["backend"] = backend
        out["backend_recipe"] = RECIPES[backend]
    if precision != "fp32":
        out["precision"] = precision
    return out


def require_packages(backend: str, packages: dict[str, str] | None = None) -> None:
    """A one-line RnbError naming the pip command when a package the backend needs is missing."""
    if backend not in PACKAGES:
        raise RnbError(f"unknown embedding backend {backend!r}", where="--embed-backend",
                       fix=f"use one of {', '.join(BACKENDS)}")
    needed = PACKAGES[backend] if packages is None else packages
    missing = [pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise RnbError(f"--embed-backend {backend} needs {', '.join(missing)}, which is not installed",
                       where="--embed-backend", fix=f"{PIP_FAST} (or pip install {' '.join(missing)}), or use "
                       "--embed-backend torch")


@lru_cache(maxsize=16)
def _content_sha256(path: str, fingerprint: str) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts):
        h.update(f"{f.relative_to(root)}\n".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def source_record(model: ModelRef) -> dict[str, Any]:
    """The source model as a derived model records it (sha256 over every file's content, not only sizes)."""
    fp = model.fingerprint()
    return {"name": model.name, "path": model.path, "fingerprint": fp, "sha256": _content_sha256(model.path, fp)}


def artifact_dir(models_dir: Path, backend: str, model: ModelRef) -> Path:
    return Path(models_dir) / f"{backend}-{model.fingerprint()}"


def verify(directory: Path, backend: str, model: ModelRef) -> BackendModel:
    """The derived model in ``directory``, checked to be ``backend`` made from ``model`` by today's recipe."""
    meta_path = Path(directory) / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RnbError(f"{meta_path} is missing or unreadable, so the {backend} model in {directory} cannot be "
                       "checked against its source model", where=str(directory),
                       fix="delete that directory (it is remade from the model on the next run)") from e
    src = meta.get("source") or {}
    mine = source_record(model)
    if meta.get("backend") != backend:
        raise RnbError(f"{directory} holds a {meta.get('backend')} model, not {backend}", where=str(directory),
                       fix="delete that directory (it is remade on the next run)")
    if src.get("fingerprint") != mine["fingerprint"] or src.get("sha256") != mine["sha256"]:
        raise RnbError(f"the {backend} model in {directory} was made from model {src.get('name')!r} "
                       f"(sha256 {str(src.get('sha256'))[:12]}), not from {model.name!r} at {model.path} "
                       f"(sha256 {mine['sha256'][:12]}); a derived model is only used with its own model",
                       where=str(directory), fix="delete that directory so it is remade from this model, or pass "
                       "--cache-dir of the run that made it with its own --model")
    if meta.get("recipe") != RECIPES[backend]:
        raise RnbError(f"the {backend} model in {directory} was made with another recipe ({meta.get('recipe')})",
                       where=str(directory), fix="delete that directory (it is remade on the next run)")
    return BackendModel(backend, str(Path(directory).absolute()), src, meta["recipe"])


def check_made_from(record: dict[str, Any] | None, model: ModelRef, *, where: str) -> None:
    """Embeddings (or centroids) made with a derived model are only reused with the model it was made from."""
    src = (record or {}).get("source") or {}
    mine = source_record(model)
    if src.get("sha256") != mine["sha256"]:
        backend = (record or {}).get("backend", "derived")
        raise RnbError(f"{where} holds embeddings of a {backend} model made from model {src.get('name')!r} "
                       f"(sha256 {str(src.get('sha256'))[:12]}), not from {model.name!r} at {model.path} "
                       f"(sha256 {mine['sha256'][:12]}), whose files have the same names and sizes",
                       where=where, fix="delete that cache entry (and its model under <cache_dir>/models), or pass "
                       "another --cache-dir")


def prepare(model: ModelRef, backend: str, models_dir: Path | str) -> BackendModel:
    """Make (once) and check the derived model of ``backend`` for ``model``; torch needs nothing.

    Runs on the driver, before any embedding actor starts. Concurrent runs that make the same directory:
    the first rename wins and the others use it (``atomic_dir(if_exists="keep")``).
    """
    require_packages(backend)
    if backend == "torch":
        return BackendModel("torch")
    target = artifact_dir(Path(models_dir), backend, model)
    if not (target / META).is_file():
        source = prepare(model, "onnx", models_dir) if backend == "onnx-int8" else None  # int8 quantises the export
        log.info("making the %s model of %s once, locally: %s", backend, model.name, target)
        t0 = time.perf_counter()
        with atomic_dir(target, if_exists="keep") as tmp:
            if backend == "onnx":
                info = _export_onnx(model, tmp)
            elif backend == "onnx-int8":
                info = _quantize(source, tmp)
            else:
                info = _distill_static(model, tmp)
            meta = {"backend": backend, "recipe": RECIPES[backend], "source": source_record(model),
                    "seconds": time.perf_counter() - t0, "versions": _versions(backend), **info}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        log.info("made the %s model in %.1f s", backend, time.perf_counter() - t0)
    return verify(target, backend, model)


def _versions(backend: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "sentence-transformers", "transformers", *PACKAGES[backend].values()):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


@contextlib.contextmanager
def _failing_as(backend: str, model: ModelRef, step: str):
    """Any failure of an export/quantisation/distillation as one line that names the model."""
    try:
        yield
    except RnbError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the exporter raises, the user gets one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RnbError(f"{step} of model {model.name!r} ({model.path}) failed: {type(e).__name__}: {first}",
                       where=model.path, fix=f"check that sentence-transformers loads this model; use --embed-backend "
                       f"torch for it (the {backend} backend could not be made from it), or another --model") from e


def _export_onnx(model: ModelRef, out: Path) -> dict[str, Any]:
    """The whole sentence-transformers module stack (transformer → pooling → [dense] → normalise) as one graph
    with inputs = the tokenizer's tensors (dynamic batch and sequence axes) and output ``sentence_embedding``;
    the tokenizer is saved beside it."""
    import warnings

    import torch

    from rnb_ray.regroup.embed import embedding_dim, load_model

    with _failing_as("onnx", model, "ONNX export"):
        st = load_model(model.path, threads=None)
        features = st.preprocess(["an example sentence", "another, somewhat longer example sentence"])
        names = [k for k, v in features.items() if isinstance(v, torch.Tensor)]
        extra = {k: v for k, v in features.items() if not isinstance(v, torch.Tensor)}  # e.g. modality="text"

        class Graph(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.st = st

            def forward(self, *tensors):
                return self.st({**dict(zip(names, tensors, strict=True)), **extra})["sentence_embedding"]

        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings are expected
            torch.onnx.export(Graph().eval(), tuple(features[n] for n in names), str(out / ONNX_FILE),
                              input_names=names, output_names=["sentence_embedding"],
                              dynamic_axes={**axes, "sentence_embedding": {0: "batch"}}, opset_version=ONNX_OPSET,
                              dynamo=False)
        st.tokenizer.save_pretrained(str(out / "tokenizer"))
        return {"inputs": names, "dim": embedding_dim(st), "max_seq_length": st.max_seq_length,
                "file": ONNX_FILE}


def _quantize(onnx: BackendModel | None, out: Path) -> dict[str, Any]:
    """int8 dynamic quantisation (weights int8 per channel, activations quantised on the fly)."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert onnx is not None and onnx.path is not None
    src = Path(onnx.path)
    meta = json.loads((src / META).read_text(encoding="utf-8"))
    model = ModelRef(onnx.source["name"], onnx.source["path"])
    with _failing_as("onnx-int8", model, "int8 quantisation of the ONNX export"):
        quantize_dynamic(str(src / ONNX_FILE), str(out / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True)
        shutil.copytree(src / "tokenizer", out / "tokenizer")
    return {k: meta[k] for k in ("inputs", "dim", "max_seq_length", "file")}


def _distill_static(model: ModelRef, out: Path) -> dict[str, Any]:
    """model2vec's distillation of the model's own transformer and tokenizer (read from the local directory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model2vec.distill import distill

    from rnb_ray.regroup.embed import load_model

    r = RECIPES["static"]
    with _failing_as("static", model, "static distillation"):
        st = load_model(model.path, threads=None)
        transformer_dir = _transformer_dir(model.path)
        static = distill(transformer_dir, device="cpu", pca_dims=r["pca_dims"], sif_coefficient=r["sif_coefficient"],
                         token_remove_pattern=r["token_remove_pattern"], quantize_to=r["dtype"], pooling=r["pooling"])
        static.save_pretrained(str(out))
        return {"dim": int(static.dim), "max_seq_length": st.max_seq_length}


def _transformer_dir(path: str) -> str:
    """The directory of the model's transformer module (the root for most models; modules.json may say otherwise)."""
    modules = Path(path) / "modules.json"
    if modules.is_file():
        for m in json.loads(modules.read_text(encoding="utf-8")):
            if m.get("type", "").endswith("Transformer") and m.get("path"):
                return str(Path(path) / m["path"])
    return path
