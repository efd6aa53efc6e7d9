"""`rnb report RUN_DIR` (PNG plots + one self-contained HTML page) and `rnb export RUN_DIR --format F`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plots and an HTML page for a pipeline or training run",
        description="Render PNG plots and one self-contained HTML page (images embedded) for a run "
                    "directory written by `rnb run` or `rnb train`.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of `rnb run` or `rnb train`")
    p.add_argument("--output", default=None, help="where to write the report (default: RUN_DIR/report)")
    p.set_defaults(handler=_report)

    from rnb_ray.export import FORMATS

    e = sub.add_parser(
        "export",
        help="write the final mixture (or, with --schedule, the mixture over training) as JSON, CSV, a "
             "Megatron-style blend list or Hugging Face interleave_datasets probabilities",
        description="json: {domain: weight}; csv: domain,weight,documents,path; megatron: one "
                    "'weight path' pair per line, path = the domain's parquet directory; hf: {domains, "
                    "probabilities, data_files, data_dirs} for datasets.interleave_datasets. --schedule: the "
                    "mixture from each step on (json/csv/hf), from the run's trajectory.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="output directory of `rnb run` or `rnb train`")
    e.add_argument("--format", default="json", help=f"one of {', '.join(FORMATS)} (default: json)")
    e.add_argument("--schedule", action="store_true",
                   help="export the schedule (step -> weights over training) instead of only the final mixture")
    e.add_argument("--output", default=None, help="file to write (default: print to stdout)")
    e.set_defaults(handler=_export)


def _report(args: argparse.Namespace) -> int:
    from rnb_ray.report.html import write_report

    page = write_report(args.run_dir, args.output)
    print(f"report: {page}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from rnb_ray.export import export

    text = export(args.run_dir, args.format, args.output, with_schedule=args.schedule)
    if args.output is None:
        sys.stdout.write(text)
    else:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
