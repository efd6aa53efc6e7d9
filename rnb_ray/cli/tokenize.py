"""`rnb tokenize`: parse flags, connect to Ray, call ``rnb_ray.tokens.job.tokenize_corpus``."""

from __future__ import annotations

import argparse
import json

from rnb_ray.cli import add_stage_command
from rnb_ray.config import load_config, overrides_from_args
from rnb_ray.tokens.config import TokenizeConfig


def run_tokenize(args: argparse.Namespace) -> int:
    from rnb_ray import ray_env
    from rnb_ray.tokens.job import tokenize_corpus

    cfg = load_config(TokenizeConfig, args.config, overrides_from_args(args, TokenizeConfig))
    ray_env.connect(args.address)
    m = tokenize_corpus(cfg)
    print(json.dumps({"output": str(cfg.output), "domains": len(m["domains"]), "documents": m["n_documents"],
                      "tokens": m["n_tokens"], "dtype": m["dtype"], "tokenizer": m["tokenizer"]["name"],
                      "dropped_empty": m["n_dropped_empty"], "dropped_no_domain": m["n_dropped_no_domain"],
                      "seconds": round(m["seconds"], 2),
                      "tokens_per_second": round(m["n_tokens"] / max(m["seconds"], 1e-9))}, indent=2))
    return 0


def register(subparsers) -> None:
    add_stage_command(
        subparsers, "tokenize", TokenizeConfig, run_tokenize,
        help="tokenise a regrouped corpus once into per-domain token shards (Megatron .bin/.idx)",
        description="Tokenise every document of a regrouped corpus with a pool of Ray Data tokenizer actors and "
                    "write TOK_OUT/domain=<id>/part-*.{bin,idx} (Megatron-LM indexed datasets, EOS appended to "
                    "each document) and TOK_OUT/tokens.json. Train on it with `rnb train --data TOK_OUT`.",
    )
