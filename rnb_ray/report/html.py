"""`rnb report`: render a run directory into PNGs and one self-contained HTML page.

The page embeds every figure as a base64 ``data:`` URI (it can be mailed or attached to a ticket alone)
and also links the PNG files next to it. Every text that comes from the corpus is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from rnb_ray import atomic
from rnb_ray.errors import RnbError
from rnb_ray.report import plots
from rnb_ray.report.rundir import RunFiles, read_json, read_metrics, resolve_run

REPRESENTATIVE_CHARS = 400  # per text shown; the page must stay readable with long documents

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}tr.best{background:#e9f7ec}
tr.failed{background:#fdecea}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.kv td{text-align:left}.muted{color:#777;font-size:.85em}
details{margin:.3em 0}summary{cursor:pointer;font-weight:600}blockquote{margin:.3em 0 .6em 1em;padding:.3em .6em;
background:#fafafa;border-left:3px solid #ccc;white-space:pre-wrap;font-size:.85em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"
    return _e(x)


def _sort_names(names: list[str]) -> list[str]:
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _figure(path: Path | None, caption: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f'<figcaption>{_e(caption)} — <a href="{_e(path.name)}">{_e(path.name)}</a></figcaption></figure>')


def _table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
           left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for j, r in enumerate(rows):
        cls = f' class="{row_classes[j]}"' if row_classes and row_classes[j] else ""
        body.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                            for i, c in enumerate(r)) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def _load(run: RunFiles) -> dict[str, Any]:
    d: dict[str, Any] = {"metrics": read_metrics(run.train)}
    for key, path in (("mixture", run.train / "mixture.json"), ("result", run.train / "result.json"),
                      ("train_config", run.train / "config.json")):
        d[key] = read_json(path) if path.is_file() else None
    d["domains"] = read_json(run.regroup / "domains.json") if run.regroup else None
    if run.sweep is not None:
        d["sweep"] = read_json(run.sweep / "results.json")
        best = run.sweep / "best.json"
        d["best"] = read_json(best) if best.is_file() else None
    else:
        d["sweep"] = d["best"] = None
    pj = run.root / "pipeline.json"
    d["pipeline"] = read_json(pj) if pj.is_file() else None
    return d


def _render_plots(run: RunFiles, d: dict[str, Any], out: Path) -> dict[str, Path | None]:
    figs: dict[str, Path | None] = {}
    mix = d["mixture"] or {}
    names = [str(n) for n in mix.get("domains") or []]
    traj = mix.get("trajectory") or []
    if traj and names:
        figs["mixture"] = plots.mixture_over_steps([t["step"] for t in traj], [t["mixture"] for t in traj], names,
                                                   out / "mixture.png",
                                                   title=f"Mixture weights over training ({mix.get('strategy', '?')})")
    else:  # fall back to the mixture logged with each step
        pts = [m for m in d["metrics"] if m.get("mixture") is not None]
        if not names and pts:
            names = [str(i) for i in range(len(pts[0]["mixture"]))]
        figs["mixture"] = plots.mixture_over_steps([m["step"] for m in pts], [m["mixture"] for m in pts], names,
                                                   out / "mixture.png")
    figs["loss"] = plots.losses(d["metrics"], out / "loss.png")
    dom = d["domains"]
    if dom and dom.get("sizes"):
        size_names = _sort_names([str(k) for k in dom["sizes"]])
        final = mix.get("final") or {}
        weights = [float(final.get(n, 0.0)) for n in size_names] if final else None
        figs["sizes"] = plots.domain_sizes(size_names, [int(dom["sizes"][n]) for n in size_names],
                                           out / "domain_sizes.png", weights)
        if dom.get("crosstab"):
            figs["crosstab"] = plots.crosstab(dom["crosstab"], size_names, out / "crosstab.png")
    if d["sweep"]:
        best_k = (d["best"] or {}).get("k")
        figs["sweep"] = plots.k_sweep(d["sweep"].get("trials", []), out / "k_sweep.png", best_k)
    return figs


def _summary(run: RunFiles, d: dict[str, Any]) -> str:
    mix, res, dom = d["mixture"] or {}, d["result"] or {}, d["domains"] or {}
    rows = [("run directory", str(run.root.resolve())), ("kind", run.kind),
            ("strategy", mix.get("strategy", "-"))]
    if mix.get("lam") is not None:
        rows.append(("λ", mix["lam"]))
    if dom:
        rows += [("domains (k)", dom.get("k", "-")), ("documents", dom.get("n_documents", "-")),
                 ("embedding model", dom.get("model", "-"))]
    for key in ("steps", "final_train_loss", "final_eval_loss", "seconds"):
        if key in res:
            rows.append((key.replace("_", " "), _num(res[key]) if isinstance(res[key], float) else res[key]))
    # Cost of the mixing method beyond training: R&B's own work (capture + Gram) and any extra
    # evaluation passes a baseline makes, from the same result.json fields for every strategy.
    if "flops_train" in res:
        train_flops = float(res["flops_train"]) or 1.0
        balance = float(res.get("flops_balance", 0.0))
        extra = float(res.get("extra_flops", 0.0))
        rows.append(("mixing cost, FLOPs (share of training)",
                     f"balance {balance:.3g} ({100 * balance / train_flops:.3g}%), "
                     f"extra evaluation passes {extra:.3g} ({100 * extra / train_flops:.3g}%)"))
        rows.append(("mixing cost, seconds",
                     f"capture {res.get('seconds_capture', 0):.3g}, round reduction {res.get('seconds_reduce', 0):.3g}, mixer round-trip {res.get('seconds_mixer', 0):.3g}, "
                     f"extra evaluation {res.get('extra_seconds', 0):.3g} (training {res.get('seconds_train', 0):.3g})"))
    pipe = d["pipeline"] or {}
    for stage, info in (pipe.get("stages") or {}).items():
        if isinstance(info, dict):
            how = "reused" if info.get("skipped") else f"{info.get('seconds', 0):.1f} s"
            rows.append((f"stage {stage}", how))
    return '<table class="kv">' + "".join(f"<tr><th class='l'>{_e(k)}</th><td>{_e(v)}</td></tr>"
                                          for k, v in rows) + "</table>"


def _mixture_table(d: dict[str, Any]) -> str:
    mix = d["mixture"] or {}
    final = mix.get("final") or {}
    if not final:
        return ""
    names = [str(n) for n in mix.get("domains") or _sort_names(list(final))]
    sizes = (d["domains"] or {}).get("sizes") or {}
    q = mix.get("q") or {}
    last_eval = next((m.get("eval_loss_by_domain") for m in reversed(d["metrics"])
                      if m.get("eval_loss_by_domain")), None) or {}
    rows = [[_e(n), _e(sizes.get(n, "-")), _num(q.get(n)), _num(final.get(n)), _num(last_eval.get(n))]
            for n in names]
    return _table(["domain", "documents", "eval share q", "final weight p", "final eval loss"], rows)


def _sweep_section(d: dict[str, Any], figs: dict[str, Path | None]) -> str:
    sweep = d["sweep"]
    if not sweep:
        return ""
    best = d["best"] or {}
    trials = sweep.get("trials", [])
    cols = ["k", "lam", "strategy", "status", "eval_loss", "steps", "silhouette", "inertia", "smallest_domain",
            "largest_domain", "seconds"]
    rows, classes = [], []
    for t in trials:
        rows.append([_num(t.get(c)) if isinstance(t.get(c), float) else _e(t.get(c, "-") if t.get(c) is not None
                                                                               else "-") for c in cols])
        classes.append("best" if t.get("trial_id") == best.get("trial_id") else
                       "failed" if t.get("status") == "failed" else "")
    parts = ["<h2>Choosing k (sweep)</h2>"]
    if best:
        parts.append(f"<p>Best: <b>k = {_e(best.get('k'))}</b>, λ = {_e(best.get('lam'))}, strategy "
                     f"{_e(best.get('strategy'))}, held-out loss {_num(best.get('eval_loss'))}.</p>")
    parts.append(_figure(figs.get("sweep"), "Held-out loss of the proxy run per k; silhouette on the right axis"))
    parts.append(_table(cols, rows, classes, left=0))
    for t in trials:
        if t.get("status") == "failed":
            parts.append(f"<p class='muted'>Trial k={_e(t.get('k'))} failed: {_e(t.get('error'))}</p>")
    for g in sweep.get("silhouette_vs_loss", []):
        r = g.get("spearman")
        verdict = ("the cheap criterion picked the same k" if g.get("agrees") else
                   "the cheap criterion picked a different k: keep the training sweep")
        at = f" at step {_e(g['at_step'])}" if g.get("at_step") is not None else ""
        parts.append(f"<p>Silhouette vs held-out loss{at} ({_e(g.get('strategy'))}, λ={_e(g.get('lam'))}, "
                     f"n={_e(g.get('n'))}): "
                     f"Spearman {_num(r, 2)}, Pearson {_num(g.get('pearson'), 2)} (negative = agreement); best "
                     f"silhouette k={_e(g.get('k_best_silhouette'))}, best loss k={_e(g.get('k_best_loss'))} — "
                     f"{_e(verdict)}.</p>")
    return "\n".join(parts)


def _representatives(d: dict[str, Any]) -> str:
    dom = d["domains"] or {}
    items = dom.get("domains") or []
    if not items:
        return ""
    final = (d["mixture"] or {}).get("final") or {}
    parts = ["<h2>Representative texts per domain</h2>",
             "<p class='muted'>The documents closest to each centroid.</p>"]
    for item in sorted(items, key=lambda x: (str(x.get("id")).lstrip("-").isdigit() is False,
                                             int(x["id"]) if str(x.get("id")).lstrip("-").isdigit() else 0,
                                             str(x.get("id")))):
        name = str(item.get("id"))
        weight = f", weight {_num(final.get(name))}" if name in final else ""
        texts = "".join(
            f"<blockquote>{_e(t if len(t) <= REPRESENTATIVE_CHARS else t[:REPRESENTATIVE_CHARS] + ' …')}</blockquote>"
            for t in (str(x) for x in item.get("representatives") or []))
        parts.append(f"<details><summary>domain {_e(name)} — {_e(item.get('size', '?'))} documents{weight}"
                     f"</summary>{texts}</details>")
    return "\n".join(parts)


def render_page(run: RunFiles, d: dict[str, Any], figs: dict[str, Path | None]) -> str:
    title = f"rnb-ray report — {run.root.resolve().name}"
    sections = [
        f"<h1>{_e(title)}</h1>", _summary(run, d),
        "<h2>Mixture</h2>", _figure(figs.get("mixture"), "Mixture weights p over training steps (stacked)"),
        _mixture_table(d),
        "<h2>Loss</h2>", _figure(figs.get("loss"), "Training loss and held-out loss per domain"),
    ]
    if figs.get("sizes") or figs.get("crosstab"):
        sections.append("<h2>Domains</h2>")
        sections.append(_figure(figs.get("sizes"), "Documents per domain and final mixture weight"))
        sections.append(_figure(figs.get("crosstab"), "Original domain × new domain (row shares)"))
    sections.append(_sweep_section(d, figs))
    sections.append(_representatives(d))
    body = "\n".join(s for s in sections if s)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render the report for ``run_dir`` into ``output`` (default RUN_DIR/report); return the HTML path."""
    run = resolve_run(run_dir)
    out = Path(output) if output is not None else run.default_report_dir
    if out.exists() and not out.is_dir():
        raise RnbError(f"report output {out} is a file", fix="pass a directory to --output")
    d = _load(run)
    if not d["metrics"] and not d["mixture"]:
        raise RnbError(f"{run.train} has neither metrics.jsonl nor mixture.json content",
                       fix="report on a run that has logged at least one step")
    with atomic.atomic_dir(out, mode=0o755) as tmp:  # a report is meant to be shared/served
        figs = _render_plots(run, d, tmp)
        (tmp / "report.html").write_text(render_page(run, d, figs), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps({"figures": {k: v.name for k, v in figs.items() if v}},
                                                    indent=2) + "\n", encoding="utf-8")
    return out / "report.html"
