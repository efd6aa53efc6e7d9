"""Write a run's mixture — the final one, or the schedule it followed — in the forms other training stacks read.

Formats (``rnb export RUN_DIR --format F [--schedule]``):

* ``json`` — ``{"<domain>": weight, ...}``: the final mixture as a mapping, in domain order. With
  ``--schedule``: ``{"domains": [...], "schedule": [{"step", "round", "weights": {domain: w}}, ...]}``.
* ``csv`` — header ``domain,weight,documents,path``; one row per domain (``documents`` from
  domains.json, ``path`` the domain's parquet directory; empty when unknown). With ``--schedule``: header
  ``step,round,<domain>,...``; one row per entry.
* ``megatron`` — one ``weight path`` pair per line, the shape of Megatron-LM's ``--data-path``/blend
  arguments (``--data-path $(cat blend.txt)``) and of NeMo/GPT-NeoX weighted data lists. ``path`` is
  the absolute directory of the domain's parquet files in the regrouped corpus. A blend is static: no
  ``--schedule``.
* ``hf`` — what Hugging Face ``datasets.interleave_datasets(parts, probabilities=...)`` takes:
  ``{"domains": [...], "probabilities": [...] (sums to 1, same order), "data_files": ["<dir>/*.parquet",
  ...] | null, "data_dirs": [...] | null}`` (one ``load_dataset("parquet", data_files=f)`` per domain; null
  when the regrouped corpus is not found). With ``--schedule`` the same plus ``"schedule": [{"step",
  "round", "probabilities": [...]}, ...]``.

A schedule entry's weights are the mixture in use *from* its step on (entry 0 is step 0, the initial
mixture; then one entry per mixing round, from ``mixture.json``'s trajectory, or from ``metrics.jsonl``'s
rows while a run has not finished).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from rnb_ray import atomic
from rnb_ray.errors import RnbError
from rnb_ray.report.rundir import RunFiles, domain_dirs, final_mixture, read_json, read_metrics, resolve_run

FORMATS = ("json", "csv", "megatron", "hf")


def _check_format(fmt: str, schedule: bool) -> None:
    if fmt not in FORMATS:
        raise RnbError(f"unknown export format {fmt!r}", where="--format", fix=f"use one of {', '.join(FORMATS)}")
    if schedule and fmt == "megatron":
        raise RnbError("a Megatron blend is one static mixture: it cannot hold a schedule", where="--schedule",
                       fix="drop --schedule (final mixture), or use --format json/csv/hf for the schedule")


def _sizes(run: RunFiles) -> dict[str, int]:
    if run.regroup is None:
        return {}
    sizes = read_json(run.regroup / "domains.json").get("sizes") or {}
    return {str(k): int(v) for k, v in sizes.items()}


def _check_weights(weights: dict[str, float], where: Path) -> None:
    bad = {n: w for n, w in weights.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise RnbError(f"the mixture in {where} has invalid weights {bad}",
                       fix="re-run training; the mixture must be finite and non-negative")


def schedule(run: RunFiles) -> list[dict[str, Any]]:
    """The mixture over training: ``[{"step", "round", "weights": {domain: w}}]``, in step order.

    From ``mixture.json``'s trajectory (a finished run), else from ``metrics.jsonl``'s ``mixture`` column
    (a run still going, or killed): an entry whenever the mixture changed.
    """
    path = run.train / "mixture.json"
    mix = read_json(path) if path.is_file() else {}
    domains = [str(d) for d in (mix.get("domains") or [])]
    entries = [{"step": int(t["step"]), "round": int(t["round"]), "mixture": t["mixture"]}
               for t in mix.get("trajectory") or [] if isinstance(t, dict) and t.get("mixture") is not None]
    if not entries:
        last = None
        for row in read_metrics(run.train):
            m = row.get("mixture")
            if m is not None and m != last:
                entries.append({"step": int(row.get("step", 0)), "round": int(row.get("round", -1)), "mixture": m})
                last = m
        if entries and not domains:
            domains = _domains_without_mixture_json(run, len(entries[0]["mixture"]))
    if not entries:
        raise RnbError(f"run {run.train} has no mixture trajectory (mixture.json has none and metrics.jsonl has "
                       "no 'mixture' rows)", where=str(run.train),
                       fix="export the final mixture without --schedule, or point at a run that trained")
    out = []
    for e in entries:
        if len(e["mixture"]) != len(domains):
            raise RnbError(f"a trajectory entry of {run.train} has {len(e['mixture'])} weights for "
                           f"{len(domains)} domains", where=str(path), fix="re-run the training stage")
        weights = {d: float(w) for d, w in zip(domains, e["mixture"], strict=True)}
        _check_weights(weights, path)
        out.append({"step": e["step"], "round": e["round"], "weights": weights})
    return out


def _domains_without_mixture_json(run: RunFiles, m: int) -> list[str]:
    """Domain names of a run that has not written mixture.json: its regrouped corpus's ids (the plan orders
    integer names numerically), else 0..m-1."""
    ids = sorted(_sizes(run), key=lambda d: (int(d), d) if d.lstrip("-").isdigit() else (0, d))
    return ids if len(ids) == m else [str(i) for i in range(m)]


def _probabilities(weights: dict[str, float]) -> list[float]:
    total = sum(weights.values())
    if total <= 0:
        raise RnbError(f"the mixture {weights} sums to {total}", fix="re-run training")
    return [w / total for w in weights.values()]


def _hf(run: RunFiles, final: dict[str, float], sched: list[dict[str, Any]] | None) -> str:
    paths = domain_dirs(run)
    known = all(n in paths for n in final)
    doc: dict[str, Any] = {
        "domains": list(final), "probabilities": _probabilities(final),
        "data_files": [f"{paths[n]}/*.parquet" for n in final] if known else None,
        "data_dirs": [str(paths[n]) for n in final] if known else None,
    }
    if sched is not None:
        doc["schedule"] = [{"step": e["step"], "round": e["round"], "probabilities": _probabilities(e["weights"])}
                           for e in sched]
    return json.dumps(doc, indent=2) + "\n"


def render(run: RunFiles, fmt: str, *, with_schedule: bool = False) -> str:
    """The export as text (no IO besides reading the run)."""
    _check_format(fmt, with_schedule)
    sched = schedule(run) if with_schedule else None
    if sched is not None and fmt == "json":
        return json.dumps({"domains": list(sched[0]["weights"]), "schedule": sched}, indent=2) + "\n"
    if sched is not None and fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        names = list(sched[0]["weights"])
        w.writerow(["step", "round", *names])
        for e in sched:
            w.writerow([e["step"], e["round"], *(repr(e["weights"][n]) for n in names)])
        return buf.getvalue()
    mixture = final_mixture(run)
    _check_weights(mixture, run.train / "mixture.json")
    if fmt == "json":
        return json.dumps(mixture, indent=2) + "\n"
    if fmt == "hf":
        return _hf(run, mixture, sched)
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


def export(run_dir: str | Path, fmt: str, output: str | Path | None = None, *, with_schedule: bool = False) -> str:
    """Render the export; write it atomically to ``output`` when given. Returns the text."""
    _check_format(fmt, with_schedule)  # before touching the run directory: the cheaper mistake first
    text = render(resolve_run(run_dir), fmt, with_schedule=with_schedule)
    if output is not None:
        out = Path(output)
        if out.is_dir():
            raise RnbError(f"--output {out} is a directory", fix="give a file name, e.g. mixture.json")
        atomic.write_text(out, text)
    return text
