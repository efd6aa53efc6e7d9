"""`rnb regroup` and `rnb assign`: parse flags, connect to Ray, call the library."""

from __future__ import annotations

import argparse
import json
import logging

from rnb_ray.cli import add_stage_command
from rnb_ray.config import load_config, overrides_from_args
from rnb_ray.regroup.config import AssignConfig, RegroupConfig


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rnb_ray").setLevel(logging.INFO)


def run_regroup(args: argparse.Namespace) -> int:
    from rnb_ray import ray_env
    from rnb_ray.regroup.regroup import regroup, validate

    cfg = load_config(RegroupConfig, args.config, overrides_from_args(args, RegroupConfig))
    validate(cfg)  # bad input fails before Ray starts
    _logging()
    ray_env.connect(args.address)
    result = regroup(cfg)
    print(json.dumps({"output": str(result.output), "k": result.k, "n_documents": result.n_documents,
                      "sizes": result.sizes, "inertia": result.inertia, "iterations": result.iterations,
                      "converged": result.converged, "embeddings": str(result.embeddings),
                      "cache_hit": result.cache_hit,
                      "seconds": {k: round(v, 2) for k, v in result.seconds.items()}}, indent=2))
    return 0


def run_assign(args: argparse.Namespace) -> int:
    from rnb_ray import ray_env
    from rnb_ray.regroup.assign import assign, validate_assign

    cfg = load_config(AssignConfig, args.config, overrides_from_args(args, AssignConfig))
    validate_assign(cfg.domains, cfg.input, cfg.output, text_column=cfg.text_column, overwrite=cfg.overwrite,
                    embed_backend=cfg.embed_backend, embed_gpus=cfg.embed_gpus, embed_precision=cfg.embed_precision)
    _logging()
    ray_env.connect(args.address)
    result = assign(cfg.domains, cfg.input, cfg.output, text_column=cfg.text_column, overwrite=cfg.overwrite,
                    embed_batch_size=cfg.embed_batch_size, embed_actors=cfg.embed_actors,
                    embed_threads=cfg.embed_threads, embed_backend=cfg.embed_backend, embed_gpus=cfg.embed_gpus,
                    embed_precision=cfg.embed_precision, cache_dir=cfg.cache_dir)
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers) -> None:
    add_stage_command(
        subparsers, "regroup", RegroupConfig, run_regroup,
        help="embed a corpus and cluster it into k domains",
        description="Embed a corpus with sentence-transformers on Ray Data, cluster it with distributed k-means, "
                    "and write it split into domains (OUT/data/domain-<id>/, OUT/domains.json).",
    )

    add_stage_command(
        subparsers, "assign", AssignConfig, run_assign,
        help="route new documents to the domains of an earlier regroup",
        description="Embed new documents with the regroup's model and give each the nearest centroid's domain.",
    )
