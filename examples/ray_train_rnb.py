"""R&B in your own Ray Train ``train_func``: a worked example of the public API (``rnb_ray.api``).

The driver starts the run's mixer actor (``DomainMixer.start``) and a ``TorchTrainer``; each worker
* builds its model (here a tiny GPT-2 from a config, random init, byte-level tokenizer: nothing to download),
* hooks ``GradientCapture`` on the output head *before* ``prepare_model`` wraps it in DDP,
* joins the mixer by name (``DomainMixer.join``) and draws its batches from p with ``domain_sampler``,
* runs an ordinary loop; every K steps it hands its per-domain sums and counts to ``send_round``, which
  reduces them among the workers over the DDP process group (the sums never leave the workers; rank 0 sends
  the mixer the counts and Gram matrix) and returns the next p, the same on every rank.
At the end the mixer writes ``RUN/mixture.json`` (the trajectory of p) and ``RUN/result.json``; every rank's
sampler state is in the final checkpoint (``RUN/checkpoints/.../sampler_rank<r>.pt``, with ``mixer.pt`` and
``model.pt``; ranks > 0 add ``mixer_rank<r>.pt``, their columns of the domain-gradient estimates). To resume,
load them (``rnb_ray.api.load_state``) into the sampler (``load_state_dict``) and, on rank 0 only,
``mixer.restore(state, step)``; the other ranks then call ``mixer.sync(their mixer_rank<r>.pt state)``.

Run it (a local Ray with 2 CPUs is enough)::

    python examples/ray_train_rnb.py --output /tmp/rnb-example --steps 20 --workers 2

With no ``--data`` it trains on the package's embedded sample corpus (standard-library docstrings, one domain
per module); ``--data FILE.parquet --domain-column COL --text-column COL`` trains on your own.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rnb_ray.api import DomainMixer, GradientCapture, causal_lm_mask, domain_names, domain_sampler, save_state


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's examples of each example's mean next-token cross-entropy."""
    targets, valid = ids[:, 1:], am[:, 1:].float()
    tok = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            targets.reshape(-1), reduction="none").view_as(targets)
    return ((tok * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: an ordinary training loop plus capture, the mixer and the domain sampler."""
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    texts_by_domain: list[list[str]] = config["texts_by_domain"]  # a real job reads its own shard here
    B, L, K = config["batch_size"], config["seq_len"], config["update_every"]

    tok = ByT5Tokenizer(extra_ids=0)
    torch.manual_seed(config["seed"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=L, n_embd=32, n_layer=1, n_head=2,
                                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id))
    capture = GradientCapture(model, num_domains=len(texts_by_domain), layers="head")  # before DDP wraps it
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])

    mixer = DomainMixer.join(config["mixer"], rank=rank)
    sampler = domain_sampler(texts_by_domain, seed=config["seed"], rank=rank, world=world)
    p = mixer.mixture
    for step in range(1, config["steps"] + 1):
        texts, domains = sampler.next_batch(p, B)
        order = np.argsort(domains, kind="stable")  # grouped by domain: capture needs no copy
        texts, domains = [texts[i] for i in order], domains[order]
        enc = tok(texts, truncation=True, max_length=L, padding=True, return_tensors="pt")
        ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with capture.batch(domains, causal_lm_mask(am)):
            loss = causal_lm_loss(model(input_ids=ids, attention_mask=am).logits, ids, am)
            loss.backward()  # DDP all-reduces param.grad as usual; the per-domain sums stay this worker's
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % K == 0:  # a mixing round: every worker's sums and counts in (reduced), the same new p out
            sums, counts = capture.take()
            p = mixer.send_round(sums, counts, step=step)
            if rank == 0:
                mixer.log({"step": step, "round": mixer.round, "train_loss": float(loss), "mixture": p.tolist()})

    with tempfile.TemporaryDirectory() as tmp:  # every rank adds its sampler state to the one checkpoint
        save_state(Path(tmp) / f"sampler_rank{rank}.pt", sampler.state_dict())
        if rank == 0:
            torch.save(model.module.state_dict() if hasattr(model, "module") else model.state_dict(),
                       Path(tmp) / "model.pt")
            save_state(Path(tmp) / "mixer.pt", mixer.state_dict())
        else:
            save_state(Path(tmp) / f"mixer_rank{rank}.pt", mixer.state_dict())
        ray.train.report({"step": config["steps"], "loss": float(loss)}, checkpoint=Checkpoint.from_directory(tmp))


def run(output: str | Path, texts_by_domain: dict[str, list[str]], *, steps: int = 20, workers: int = 2,
        update_every: int = 5, batch_size: int = 8, seq_len: int = 64, lam: float = 3.0, lr: float = 3e-3,
        seed: int = 0) -> dict[str, Any]:
    """The driver: the mixer actor, then ``TorchTrainer.fit()``; returns the mixer's summary (final mixture,
    rounds, ...) and the final checkpoint's path."""
    from rnb_ray.ray_env import require_resources

    run_dir = Path(output).resolve()
    if not ray.is_initialized():
        ray.init()
    require_resources(cpus=workers, what=f"the example with {workers} workers")
    domains = list(texts_by_domain)
    name = f"rnb-mixer-{uuid.uuid4().hex[:8]}"
    mixer = DomainMixer.start(name, run_dir, domains, num_workers=workers, lam=lam,
                              sizes=[len(texts_by_domain[d]) for d in domains])
    try:
        result = TorchTrainer(
            train_func,
            train_loop_config={"mixer": name, "texts_by_domain": [texts_by_domain[d] for d in domains],
                               "steps": steps, "update_every": update_every, "batch_size": batch_size,
                               "seq_len": seq_len, "lr": lr, "seed": seed},
            scaling_config=ScalingConfig(num_workers=workers),
            run_config=RunConfig(name="checkpoints", storage_path=str(run_dir)),
        ).fit()
        return {**mixer.finish(steps=steps, workers=workers), "checkpoint": result.checkpoint.path}
    finally:
        mixer.close()


def load_texts(data: str | None, domain_column: str, text_column: str, max_domains: int) -> dict[str, list[str]]:
    """{domain: texts} from a parquet file, or from the embedded sample corpus (domain = stdlib module)."""
    import pyarrow.parquet as pq

    if data is None:
        from rnb_ray.sample import sample_rows

        rows = sample_rows(("asyncio", "decimal", "email", "logging")[:max_domains])
        domain_column, text_column = "source", "text"
    else:
        rows = pq.read_table(data, columns=[domain_column, text_column]).to_pydict()
    by: dict[str, list[str]] = {}
    for d, t in zip(rows[domain_column], rows[text_column], strict=True):
        by.setdefault(str(d), []).append(t)
    return {d: by[d] for d in domain_names(list(by))[:max_domains]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="run directory (mixture.json, metrics.jsonl, checkpoints/)")
    ap.add_argument("--data", help="a parquet file with a domain and a text column (default: the sample corpus)")
    ap.add_argument("--domain-column", default="domain")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--max-domains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--update-every", type=int, default=5)
    ap.add_argument("--lam", type=float, default=3.0)
    a = ap.parse_args(argv)
    texts = load_texts(a.data, a.domain_column, a.text_column, a.max_domains)
    summary = run(a.output, texts, steps=a.steps, workers=a.workers, update_every=a.update_every, lam=a.lam)
    print(json.dumps({"final_mixture": summary["final_mixture"], "rounds": summary["rounds"]}))


if __name__ == "__main__":
    main()
