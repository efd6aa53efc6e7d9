"""`rnb` — the command line. Thin: parse arguments, call the library, print RnbError without traceback.

Each command lives in its own module here and exposes ``register(subparsers)``; the registered handler
receives the parsed ``argparse.Namespace`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rnb_ray.errors import RnbError

# Module name under rnb_ray.cli for each command group; a module may register several commands.
COMMAND_MODULES = ("regroup", "tokenize", "train", "sweep", "pipeline", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnb",
        description="R&B data mixing on Ray: regroup a corpus into domains, balance training across them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"rnb_ray.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"rnb_ray.cli.{name}":
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


def add_stage_command(subparsers, name: str, cfg_cls: type, handler, *, help: str,  # noqa: A002
                      description: str) -> argparse.ArgumentParser:
    """One stage's subcommand: its config dataclass's fields as flags, ``--address``, and the handler."""
    from rnb_ray.config import add_config_args

    p = subparsers.add_parser(name, help=help, description=description)
    add_config_args(p, cfg_cls)
    add_address_arg(p)
    p.set_defaults(handler=handler)
    return p


def add_address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to use (host:port, ray://host:10001 or 'auto'); default: RAY_ADDRESS or a new local Ray",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except RnbError as e:
        from rnb_ray.ray_env import job_driver_node

        node = job_driver_node()  # in a Ray job, local paths are resolved on the driver's node
        where = f" [Ray job driver on node {node}: paths are resolved there, on storage every node must see]" if node else ""
        print(f"rnb {args.command}: error: {e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rnb {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
