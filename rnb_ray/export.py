"""Write a run's final mixture in the forms other training stacks read.

Formats (``rnb export RUN_DIR --format F``):

* ``json`` — ``{"<domain>": weight, ...}``: the mixture as a mapping, in domain order.
* ``csv`` — header ``domain,weight,documents,path``; one row per domain (``documents`` from
  domains.json, ``path`` the domain's parquet directory; empty when unknown).
* ``megatron`` — one ``weight path`` pair per line, the shape of Megatron-LM's ``--data-path``/blend
  arguments (``--data-path $(cat blend.txt)``) and of NeMo/GPT-NeoX weighted data lists. ``path`` is
  the absolute directory of the domain's parquet files in the regrouped corpus.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from rnb_ray import atomic
from rnb_ray.errors import RnbError
from rnb_ray.report.rundir import RunFiles, domain_dirs, final_mixture, read_json, resolve_run

FORMATS = ("json", "csv", "megatron")


def _sizes(run: RunFiles) -> dict[str, int]:
    if run.regroup is None:
        return {}
    sizes = read_json(run.regroup / "domains.json").get("sizes") or {}
    return {str(k): int(v) for k, v in sizes.items()}


def render(run: RunFiles, fmt: str) -> str:
    """The export as text (no IO besides reading the run)."""
    if fmt not in FORMATS:
        raise RnbError(f"unknown export format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")
    mixture = final_mixture(run)
    bad = {n: w for n, w in mixture.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise RnbError(f"the final mixture in {run.train / 'mixture.json'} has invalid weights {bad}",
                       fix="re-run training; the mixture must be finite and non-negative")
    if fmt == "json":
        return json.dumps(mixture, indent=2) + "\n"
    paths = domain_dirs(run)
    if fmt == "csv":
        sizes = _sizes(run)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["domain", "weight", "documents", "path"])
        for name, weight in mixture.items():
            w.writerow([name, repr(weight), sizes.get(name, ""), str(paths.get(name, ""))])
        return buf.getvalue()
    # megatron
    missing = [n for n in mixture if n not in paths]
    if missing:
        where = run.regroup / "data" if run.regroup else run.train / "config.json"
        raise RnbError(
            f"no parquet directory found for domain(s) {', '.join(missing)}",
            where=str(where),
            fix="the megatron format needs the regrouped corpus the run trained on; keep it next to the run "
                "or use --format json/csv",
        )
    return "".join(f"{weight!r} {paths[name]}\n" for name, weight in mixture.items())


def export(run_dir: str | Path, fmt: str, output: str | Path | None = None) -> str:
    """Render the export; write it atomically to ``output`` when given. Returns the text."""
    if fmt not in FORMATS:  # before touching the run directory: the cheaper mistake first
        raise RnbError(f"unknown export format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")
    text = render(resolve_run(run_dir), fmt)
    if output is not None:
        out = Path(output)
        if out.is_dir():
            raise RnbError(f"--output {out} is a directory", fix="give a file name, e.g. mixture.json")
        atomic.write_text(out, text)
    return text
