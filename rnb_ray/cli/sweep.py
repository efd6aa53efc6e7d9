"""`rnb sweep`: choose k (and λ, strategy) with Ray Tune proxy runs."""

from __future__ import annotations

import argparse
import logging

from rnb_ray.cli import add_stage_command
from rnb_ray.config import load_config, overrides_from_args
from rnb_ray.ray_env import quiet_ray_logs
from rnb_ray.sweep.config import SweepConfig


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from rnb_ray import ray_env
    from rnb_ray.sweep.tune import _validate_input, run_sweep

    cfg = load_config(SweepConfig, args.config, overrides_from_args(args, SweepConfig))
    _validate_input(cfg)  # bad input fails before Ray starts
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_ray_logs()
    ray_env.connect(args.address)
    run_sweep(cfg)
    return 0


def register(subparsers) -> None:
    add_stage_command(
        subparsers, "sweep", SweepConfig, run_sweep_cmd,
        help="pick the number of domains k with Ray Tune (proxy training runs + silhouette)",
        description="Embed the corpus once, then one Ray Tune trial per (k, λ, strategy): cluster into k "
                    "domains, train a short proxy run, report held-out loss (ASHA stops poor trials). Writes "
                    "OUT/results.csv, OUT/results.json, OUT/best.json and (--write-best) OUT/regrouped/.",
    )
