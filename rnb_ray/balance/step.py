"""One training step and one evaluation pass of a Balance worker (torch only, no Ray).

``train_step`` is the step every worker runs and the benchmarks time: ``forward_backward`` — with
``capture`` given, the captured layers' weight gradients are formed one GEMM per domain inside that same
backward and added to per-domain sums (``DomainGradCapture``) — then gradient clipping, the optimizer and
the learning-rate schedule. ``next_batch`` draws the batch from the mixture and orders it by domain when
capture needs it; ``evaluate`` sums per-domain losses over a worker's evaluation texts; ``dump_batch``
saves a step's batch for ``debug_dump_rounds``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnb_ray.balance.capture import DomainGradCapture
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.lm import encode, grad_token_mask, per_example_loss
from rnb_ray.balance.sampler import DomainSampler


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), right padding
    domains: np.ndarray  # (B,) domain index of each example


def next_batch(sampler: DomainSampler, p: np.ndarray, batch_size: int, tok: Any, seq_len: int,
               device: torch.device | str | None = None, *, by_domain: bool = False) -> Batch:
    """Draw each example's domain from ``p`` and tokenize (packed sequences from token shards are used as
    they are: ``lm.encode``). ``by_domain`` orders the examples by domain
    (stable), so that each domain's rows are contiguous and capture groups them without a copy."""
    texts, doms = sampler.next_batch(p, batch_size)  # texts, or packed token sequences (token shards)
    if by_domain:
        order = np.argsort(doms, kind="stable")
        texts, doms = [texts[i] for i in order], np.asarray(doms)[order]
    ids, am = encode(tok, texts, seq_len, device)
    return Batch(ids, am, np.asarray(doms))


def optimizer_for(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its schedule: linear warmup over ``warmup_steps``, then cosine to 10% at ``steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def forward_backward(model: nn.Module, batch: Batch, *, capture: DomainGradCapture | None = None,
                     autocast: contextlib.AbstractContextManager[Any] | None = None) -> torch.Tensor:
    """Forward, mean per-example loss, backward; returns the (detached) loss.

    With ``capture``, the batch's per-domain gradient sums of the captured layers are accumulated in the
    same backward (the batch should be ordered by domain: ``next_batch(..., by_domain=True)``).
    """
    ids, am = batch.input_ids, batch.attention_mask
    if capture is not None:
        capture.begin(torch.as_tensor(batch.domains), grad_token_mask(am), scale=len(batch.domains))
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = model(input_ids=ids, attention_mask=am).logits
    loss = per_example_loss(logits, ids, am).mean()
    loss.backward()
    if capture is not None:
        capture.end()
    return loss.detach()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: Batch, *,
               capture: DomainGradCapture | None = None,
               autocast: contextlib.AbstractContextManager[Any] | None = None) -> torch.Tensor:
    """One optimizer step on ``batch`` (``forward_backward``, gradient clipping, optimizer, schedule);
    returns the loss. ``scheduler`` may be None (benchmarks timing the step alone)."""
    loss = forward_backward(model, batch, capture=capture, autocast=autocast)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def eval_grad_step(model: nn.Module, capture: DomainGradCapture, texts: list[str], tok: Any, seq_len: int,
                   device: torch.device, no_sync: contextlib.AbstractContextManager[Any]) -> int:
    """Forward+backward of the evaluation loss on ``texts``, adding its gradient of the captured layers to
    ``capture``'s evaluation sum (``no_sync``: gradients stay local); returns the tokens processed."""
    ids, am = encode(tok, texts, seq_len, device)
    with no_sync:
        capture.begin(torch.zeros(len(texts), dtype=torch.long), grad_token_mask(am), scale=len(texts),
                      target="eval")
        per_example_loss(model(input_ids=ids, attention_mask=am).logits, ids, am).mean().backward()
        capture.end()
    model.zero_grad(set_to_none=True)
    return ids.numel()


def evaluate(model: nn.Module, tok: Any, texts_by_domain: list[list[str]], *, batch_size: int, seq_len: int,
             device: torch.device | str) -> tuple[torch.Tensor, int]:
    """(per-domain loss sums then example counts, as one float64 (2m,) tensor on ``device``; tokens processed).

    The loss of an example is its mean next-token cross-entropy (``per_example_loss``); no autocast.
    """
    m = len(texts_by_domain)
    acc = torch.zeros(2 * m, dtype=torch.float64, device=device)
    tokens = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for d, texts in enumerate(texts_by_domain):
            for i in range(0, len(texts), batch_size):
                ids, am = encode(tok, texts[i: i + batch_size], seq_len, device)
                losses = per_example_loss(model(input_ids=ids, attention_mask=am).logits, ids, am)
                acc[d] += losses.double().sum()
                acc[m + d] += len(losses)
                tokens += ids.numel()
    model.train(was_training)
    return acc, tokens


def dump_batch(debug_dir: Path, round_: int, step: int, rank: int, batch: Batch, model: nn.Module) -> None:
    """``debug_dump_rounds``: a step's batch, and (rank 0) the weights its gradients are taken at."""
    debug_dir.mkdir(parents=True, exist_ok=True)
    stem = f"round_{round_:04d}_step_{step:06d}"
    np.savez(debug_dir / f"{stem}_rank_{rank}.npz", input_ids=batch.input_ids.cpu().numpy(),
             attention_mask=batch.attention_mask.cpu().numpy(), domains=batch.domains)
    if rank == 0:  # identical on every rank
        torch.save(model.state_dict(), debug_dir / f"{stem}_model.pt")


def token_counts(sampler: DomainSampler, m: int, batch_size: int, tok: Any, seq_len: int, rows: int,
                 tokens: int = 65_536) -> torch.Tensor:
    """How often each token id (< ``rows``) occurs in about ``tokens`` tokens drawn from ``sampler`` uniformly
    over its ``m`` domains (what ``sketch_frequent_rows`` ranks the head's rows by). Give it a sampler of its
    own: it advances the streams."""
    uniform = np.full(m, 1.0 / m)
    counts = torch.zeros(rows, dtype=torch.float64)
    for _ in range(min(256, max(8, -(-tokens // (batch_size * seq_len))))):
        b = next_batch(sampler, uniform, batch_size, tok, seq_len)
        ids = torch.as_tensor(b.input_ids)[torch.as_tensor(b.attention_mask).bool()]
        counts += torch.bincount(ids[ids < rows], minlength=rows).double()
    return counts
