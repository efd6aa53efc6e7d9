"""The checkpoint format of a Balance run: what a checkpoint directory holds and how it is read back.

A checkpoint is one directory (Ray Train's ``checkpoint_*``, or ``RUN/checkpoints/local/checkpoint_<step>``
for in-process runs) with four files, each written with ``torch.save`` and read with ``weights_only=True``
(loading a checkpoint cannot run code):

* ``model.pt``     the model's ``state_dict`` (the unwrapped model, not DDP's wrapper)
* ``optimizer.pt`` the optimizer's ``state_dict``
* ``trainer.pt``   ``{"step", "world", "p", "pending_round", "scheduler", "samplers", "torch_rng", "totals",
  "estimates"}``: the step reached, the number of workers, the mixture in use, the stale round not applied yet
  (or None), the learning-rate scheduler's state, and per rank the sampler state, torch RNG state, counters
  and its columns of the domains' gradient estimates with their Gram matrix (``gram_terms.DomainEstimates``)
* ``mixer.pt``     the mixer's state (``mixer.save_state``)

Where checkpoints live and how they are published (Ray Train's report, or a local copy) is the runtime's
business (``balance/runtime.py``); this module only writes and reads the directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.lm import load_tokenizer, model_for
from rnb_ray.balance.mixer import load_state, save_state
from rnb_ray.errors import RnbError

MODEL, OPTIMIZER, TRAINER, MIXER = "model.pt", "optimizer.pt", "trainer.pt", "mixer.pt"


@dataclass
class WorkerState:
    """One rank's share of a checkpoint (gathered to rank 0, which writes them all)."""

    sampler: dict[str, Any]
    rng: torch.Tensor
    totals: dict[str, float]
    estimates: dict[str, Any] | None = None  # this rank's columns of the domain estimates (gram_terms)


@dataclass
class Restored:
    """What a worker continues from; the model and optimizer are loaded in place."""

    step: int
    p: np.ndarray
    pending_round: int | None
    scheduler: dict[str, Any]
    worker: WorkerState
    mixer: dict[str, Any]


def save(d: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, p: Any,
         pending_round: int | None, workers: list[WorkerState], mixer_state: dict[str, Any]) -> None:
    """Write a checkpoint into the existing directory ``d`` (``workers`` in rank order)."""
    torch.save(model.state_dict(), d / MODEL)
    torch.save(optimizer.state_dict(), d / OPTIMIZER)
    trainer = {"step": step, "world": len(workers), "p": list(map(float, p)), "pending_round": pending_round,
               "scheduler": scheduler.state_dict(), "samplers": [w.sampler for w in workers],
               "torch_rng": [w.rng for w in workers], "totals": [w.totals for w in workers],
               "estimates": [w.estimates for w in workers]}
    torch.save(trainer, d / TRAINER)
    save_state(d / MIXER, mixer_state)


def load(d: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world: int,
         device: torch.device) -> Restored:
    """Load the model and optimizer in place; return the rest of rank ``rank``'s state."""
    state = torch.load(d / TRAINER, map_location="cpu", weights_only=True)
    if state["world"] != world:
        raise RnbError(f"the checkpoint was written by {state['world']} workers, this run has {world}",
                       where=str(d), fix=f"resume with --workers {state['world']}")
    model.load_state_dict(torch.load(d / MODEL, map_location=device, weights_only=True))
    optimizer.load_state_dict(torch.load(d / OPTIMIZER, map_location=device, weights_only=True))
    estimates = state.get("estimates") or [None] * world
    worker = WorkerState(sampler=state["samplers"][rank], rng=state["torch_rng"][rank], totals=state["totals"][rank],
                         estimates=estimates[rank])
    return Restored(step=state["step"], p=np.asarray(state["p"]), pending_round=state["pending_round"],
                    scheduler=state["scheduler"], worker=worker, mixer=load_state(d / MIXER))


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds any checkpoint (Ray Train's or in-process)."""
    return any((Path(run_dir) / "checkpoints").rglob("checkpoint_*"))


def latest(run_dir: str | Path) -> Path:
    """The newest checkpoint directory of a run (Ray Train names them by time, in-process runs by step)."""
    cks = [p.parent for p in Path(run_dir).glob(f"checkpoints/**/{MODEL}")]
    if not cks:
        raise RnbError(f"{run_dir} has no checkpoint with {MODEL}", where=str(run_dir),
                       fix="train with --checkpoint-every, or let the run finish (it checkpoints at the end)")
    return max(cks, key=lambda p: (p.stat().st_mtime, p.name))


def model_from_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, TrainConfig]:
    """(model with the run's newest checkpointed weights, tokenizer, TrainConfig) of a run directory."""
    saved = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})  # a finished run: no re-validation
    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    model = model_for(cfg, tok)
    model.load_state_dict(torch.load(latest(run_dir) / MODEL, map_location=device, weights_only=True))
    return model.to(device), tok, cfg
