"""`rnb train`: parse flags, connect to Ray, call ``rnb_ray.balance.train.train``."""

from __future__ import annotations

import argparse
import json
import logging

from rnb_ray.balance.config import TrainConfig, resume_overrides
from rnb_ray.cli import add_stage_command
from rnb_ray.config import load_config, overrides_from_args


def run_train(args: argparse.Namespace) -> int:
    from rnb_ray import ray_env
    from rnb_ray.balance.train import train

    overrides = overrides_from_args(args, TrainConfig)
    if overrides.get("resume"):
        # Continue a run: its saved settings, then whatever the flags change (e.g. --steps).
        overrides = {**resume_overrides(overrides["resume"]), **overrides}
    cfg = load_config(TrainConfig, args.config, overrides)  # validated before Ray starts
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ray_env.connect(args.address)
    result = train(cfg)
    s = result.summary
    print(json.dumps({
        "run_dir": str(result.run_dir), "steps": result.steps, "final_eval_loss": result.final_eval_loss,
        "final_train_loss": result.final_train_loss, "mixture": result.mixture,
        "rounds": s.get("rounds"), "skipped_rounds": s.get("skipped_rounds"),
        "seconds": {k: round(float(s[k]), 3) for k in ("seconds_total", "seconds_train", "seconds_capture",
                                                        "seconds_reduce", "seconds_mixer", "extra_seconds") if s.get(k) is not None},
        "balance_flops_ratio": s.get("balance_flops_ratio"),
    }, indent=2))
    return 0


def register(subparsers) -> None:
    add_stage_command(
        subparsers, "train", TrainConfig, run_train,
        help="train a language model with an R&B (or baseline) data mixture on Ray Train",
        description="Train on a corpus with a domain column (e.g. `rnb regroup` output) with TorchTrainer; the "
                    "run's mixer actor updates the mixture every --update-every steps from per-domain gradients "
                    "captured in the ordinary backward pass. Writes RUN/{config.json,metrics.jsonl,mixture.json,"
                    "result.json,checkpoints/}. Continue a run with --resume RUN.",
    )
