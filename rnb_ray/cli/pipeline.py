"""`rnb run`: regroup → sweep k → regroup at the best k → R&B training → report, in one run directory."""

from __future__ import annotations

import argparse
import logging

from rnb_ray.cli import add_stage_command
from rnb_ray.config import load_config, overrides_from_args
from rnb_ray.pipeline import PipelineConfig
from rnb_ray.ray_env import quiet_ray_logs


def run_pipeline_cmd(args: argparse.Namespace) -> int:
    from rnb_ray.pipeline import run_pipeline

    cfg = load_config(PipelineConfig, args.config, overrides_from_args(args, PipelineConfig))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_ray_logs()
    run_pipeline(cfg, address=args.address)
    return 0


def register(subparsers) -> None:
    add_stage_command(
        subparsers, "run", PipelineConfig, run_pipeline_cmd,
        help="the whole method in one command: regroup, sweep k, train with R&B, report",
        description="Without --input, runs on the embedded corpus (standard-library docstrings). Every stage "
                    "writes under --output; a stage whose output exists for the same settings is reused.",
    )
