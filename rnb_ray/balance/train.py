"""R&B mixture training on Ray Train: ``train(cfg)``, the ``TorchTrainer`` driver.

``train(cfg: TrainConfig) -> TrainResult`` validates, plans the data, creates the run directory and the
run's mixer actor, runs a ``TorchTrainer`` with ``cfg.workers`` DDP workers (gloo on CPU, nccl on GPU) —
each runs ``Trainer(setup, RayTrainRuntime(...)).train()`` — then the mixer writes ``mixture.json`` and
``result.json``. Resumes with ``cfg.resume = RUN``. Raises ``RnbError`` for anything a user can fix —
before any Ray work where possible. The CLI ``rnb train``, ``jobs/train.py`` and ``rnb run`` call it.

The pieces, for the next reader:

* ``balance/run_setup.py``      what the driver decides once (data plan, mixer spec, the strategy's needs)
* ``balance/trainer.py``    the worker loop (``Trainer``) and ``run_training_loop``: the same loop in the
  calling process, one worker, no TorchTrainer (the sweep's trials)
* ``balance/step.py``       ``train_step``, ``next_batch``, ``evaluate`` (torch only)
* ``balance/runtime.py``    in-process vs Ray Train, local mixer vs mixer actor, ``PendingRound``
* ``balance/checkpoint.py`` the checkpoint format
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnb_ray.balance.checkpoint import has_checkpoint
from rnb_ray.balance.config import TrainConfig, resolve_resume
from rnb_ray.balance.lm import check_model_source, load_tokenizer
from rnb_ray.balance.mixer import create_mixer
from rnb_ray.balance.progress import ProgressPrinter
from rnb_ray.balance.run_setup import RunSetup, make_spec, setup_run
from rnb_ray.balance.runtime import RayTrainRuntime
from rnb_ray.balance.trainer import Trainer, run_training_loop
from rnb_ray.config import save_config
from rnb_ray.errors import RnbError
from rnb_ray.ray_env import connect, require_resources

__all__ = ["TrainResult", "make_spec", "run_training_loop", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run returns; everything is also in ``RUN/result.json`` and ``RUN/mixture.json``."""

    run_dir: Path
    final_eval_loss: float
    final_train_loss: float
    eval_loss_by_domain: dict[str, float]
    mixture: dict[str, float]
    steps: int
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_summary(cls, run_dir: Path, summary: dict[str, Any]) -> TrainResult:
        return cls(run_dir=run_dir, final_eval_loss=float(summary.get("final_eval_loss", float("nan"))),
                   final_train_loss=float(summary.get("final_train_loss") or float("nan")),
                   eval_loss_by_domain=dict(summary.get("eval_loss_by_domain") or {}),
                   mixture=dict(summary.get("final_mixture") or {}), steps=int(summary.get("steps", 0)),
                   summary=summary)


def prepare_run(cfg: TrainConfig) -> RunSetup:
    """Everything checkable before Ray work: settings, data, strategy options, model, run directory."""
    cfg = resolve_resume(cfg.validate())
    setup = setup_run(cfg, cfg.workers)
    check_model_source(cfg.model)
    load_tokenizer(cfg.model, cfg.tokenizer)
    run = cfg.run_dir
    if cfg.resume:
        if not has_checkpoint(run):
            raise RnbError(f"{run} has no checkpoint to resume from", where="--resume",
                           fix="set --checkpoint-every on the first run, or start a new run")
    elif run.exists() and any(run.iterdir()):
        raise RnbError(f"output directory {run} already exists and is not empty", where="--output",
                       fix="choose a new --output, or continue that run with --resume")
    for w in setup.plan.warnings:
        log.warning(w)
        print(f"rnb train: warning: {w}", file=sys.stderr)
    return setup


def _train_fn(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    setup: RunSetup = config["setup"]
    Trainer(setup, RayTrainRuntime(config["mixer"], setup.cfg.round_timeout_s)).train()


def _failure_message(err: BaseException) -> str:
    """The most specific message inside a Ray Train failure (an RnbError from a worker if there is one)."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, exc in sorted(failures.items()):
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, RnbError):
                return f"worker {rank}: {seen}"
            cause = getattr(seen, "cause", None)
            seen = cause if isinstance(cause, BaseException) else seen.__cause__
        text = str(exc).strip().splitlines()
        return f"worker {rank}: {text[-1] if text else type(exc).__name__}"
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a Balance training run on Ray Train; see the module docstring.

    Connects to Ray if needed (``RAY_ADDRESS`` or a local Ray). The run directory gets ``config.json``,
    ``metrics.jsonl``, ``mixture.json``, ``result.json``, ``checkpoints/`` (Ray Train storage) and
    ``mixer/`` (the mixer's persisted state). On a multi-node cluster ``--output`` must be on storage
    every node can reach (as Ray Train requires for checkpoints).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    setup = prepare_run(cfg)
    cfg = setup.cfg
    connect(None)
    require_resources(cpus=0 if cfg.use_gpu else cfg.workers, gpus=cfg.workers if cfg.use_gpu else 0,
                      what=f"training with {cfg.workers} workers")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        save_config(cfg, cfg.run_dir / "config.json")
    t0 = time.perf_counter()
    name = f"rnb-mixer-{uuid.uuid4().hex[:12]}"
    handle = create_mixer(setup.spec, name, max_restarts=max(5, cfg.max_failures + 1))
    try:
        ray.get(handle.ping.remote(), timeout=60)
        trainer = TorchTrainer(
            _train_fn,
            train_loop_config={"setup": setup, "mixer": name},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
            run_config=RunConfig(
                name="checkpoints", storage_path=str(cfg.run_dir),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        progress = None if cfg.quiet else ProgressPrinter(
            lambda: ray.get(handle.latest.remote(), timeout=10), domains=setup.plan.domains,
            steps=cfg.stop_after if 0 < cfg.stop_after < cfg.steps else cfg.steps).start()
        try:
            trainer.fit()
        except RnbError:
            raise
        except Exception as e:  # noqa: BLE001 — Ray Train wraps worker errors in its own types
            raise RnbError(f"training failed: {_failure_message(e)}", where=str(cfg.run_dir),
                           fix="see the message above; completed checkpoints can be continued with --resume") from e
        finally:
            if progress is not None:
                progress.stop()
        summary = ray.get(handle.finish.remote({"seconds_total": time.perf_counter() - t0}), timeout=120)
    finally:
        with contextlib.suppress(Exception):
            ray.kill(handle)
    return TrainResult.from_summary(cfg.run_dir, summary)
