"""`--model path/to/x.gguf`: a local GGUF file is the run's model and tokenizer (transformers' GGUF loader,
the ``gguf`` package). The file is a tiny llama written here with gguf's own writer; a file that is not GGUF,
or a missing ``gguf`` package, gives one clear RnbError before any work."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.lm import build_model, check_model_source, load_tokenizer
from rnb_ray.errors import RnbError

gguf = pytest.importorskip("gguf")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: 256 one-character tokens, a byte-level BPE's base vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_llama_gguf(path, *, hidden: int = 16, layers: int = 1, heads: int = 2, ff: int = 32, ctx: int = 64,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """A 1-block llama with a byte-level BPE tokenizer (llama.cpp's tensor names); returns the tensors written."""
    rng = np.random.default_rng(seed)
    tokens = [*_byte_alphabet(), "Ġt", "he", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: control (the end-of-text token)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"token_embd.weight": rand(len(tokens), hidden)}
    for i in range(layers):
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(hidden, np.float32)
        for n in ("q", "k", "v", "output"):
            tensors[f"blk.{i}.attn_{n}.weight"] = rand(hidden, hidden)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(hidden, np.float32)
        tensors[f"blk.{i}.ffn_gate.weight"] = rand(ff, hidden)
        tensors[f"blk.{i}.ffn_up.weight"] = rand(ff, hidden)
        tensors[f"blk.{i}.ffn_down.weight"] = rand(hidden, ff)
    tensors["output_norm.weight"] = np.ones(hidden, np.float32)
    tensors["output.weight"] = rand(len(tokens), hidden)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


def test_a_gguf_file_is_the_model_and_the_tokenizer(tiny_gguf):
    path, tensors = tiny_gguf
    check_model_source(str(path))
    tok = load_tokenizer(str(path), None)
    assert len(tok) == 259 and tok.eos_token == "<|endoftext|>" and tok.pad_token is not None
    assert tok("the")["input_ids"] == [83, 257]  # 't', then the merged 'he' from the file's merges
    model = build_model(str(path), vocab_size=len(tok), seq_len=8, n_layer=1, n_head=1, n_embd=8,
                        pad_token_id=tok.pad_token_id, seed=0)
    assert type(model).__name__ == "LlamaForCausalLM"
    # the weights are the file's (the head is not permuted by the loader; the embedding table neither)
    assert torch.equal(model.lm_head.weight.detach(), torch.from_numpy(tensors["output.weight"]))
    assert torch.equal(model.get_input_embeddings().weight.detach(), torch.from_numpy(tensors["token_embd.weight"]))


def test_a_run_trains_a_gguf_model(tiny_gguf, tmp_path):
    from rnb_ray.balance.checkpoint import model_from_run
    from rnb_ray.balance.trainer import run_training_loop
    from rnb_ray.config import save_config

    path, tensors = tiny_gguf
    data = tmp_path / "corpus.parquet"
    texts = [f"the {w} number {i}" for i in range(24) for w in ("cat", "dog")]
    pq.write_table(pa.table({"text": texts, "domain": ["a", "b"] * 24}), data)
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(data), output=str(run), model=str(path), strategy="rnb", workers=1, batch_size=4,
                      seq_len=16, steps=4, update_every=2, eval_every=4, log_every=2, lr=1e-2).validate()
    run.mkdir()
    save_config(cfg, run / "config.json")
    summary = run_training_loop(cfg, records=True)
    assert summary["steps"] == 4 and np.isfinite(summary["final_eval_loss"])
    assert json.loads((run / "mixture.json").read_text())["trajectory"][-1]["round"] == 1
    model, tok, _ = model_from_run(run)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 259
    assert not torch.equal(model.lm_head.weight.detach(), torch.from_numpy(tensors["output.weight"]))  # it trained


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(RnbError, match="not a GGUF file") as e:
        check_model_source(str(fake))
    assert "--model" in str(e.value)
    with pytest.raises(RnbError, match="does not exist"):
        build_model(str(tmp_path / "missing.gguf"), vocab_size=10, seq_len=8, n_layer=1, n_head=1, n_embd=8,
                    pad_token_id=0, seed=0)


def test_a_missing_gguf_package_is_named(tiny_gguf, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(RnbError, match="needs the 'gguf' package") as e:
        load_tokenizer(str(tiny_gguf[0]), None)
    assert "pip install gguf" in str(e.value)
