"""Why does (or doesn't) R&B beat stratified sampling on fortunes? One knob at a time.

Issue 6 asks, when R&B does not win, to try the inverse temperature λ (the paper's η-like knob), the
update frequency (steps per round), the parameter subset the gradients come from, and sketching. This
script runs R&B over the original categories and over the regrouped domains once per variant (same
seeds, steps and data as the base fidelity run), and pairs every R&B run with the *base* run's
stratified runs of the same seed — stratified sampling does not depend on any of these knobs, so one
set of baselines serves every variant.

    python benchmarks/fidelity_investigate.py              # run the variants (reduced setting), then the table
    python benchmarks/fidelity_investigate.py --table-only # rebuild the table from existing results

Needs the base run first: ``python benchmarks/fidelity.py --quick --arms all --seeds 0,1,2`` (or
``run_all.py``), whose stratified runs it compares against. Writes
benchmarks/results/fidelity_<variant>.json per variant and fidelity_investigation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"

# name -> fidelity.py flags that differ from the base run (which uses λ=3, 10-step rounds, head, exact)
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "lam1": ["--lam", "1"],
    "lam10": ["--lam", "10"],
    "lam30": ["--lam", "30"],
    "round5": ["--update-every", "5"],
    "round20": ["--update-every", "20"],
    "head+last_block": ["--capture", "head+last_block"],
    "sketch4096": ["--sketch-dim", "4096"],
}
RNB_ARMS = ("rnb/original", "rnb/regrouped")
BASELINES = {"rnb/original": "stratified/original", "rnb/regrouped": ("stratified/original", "stratified/regrouped")}


def _mixture_spread(mix: Any) -> tuple[float, float]:
    """(max/min ratio, total-variation distance from uniform) of a final mixture (dict or list)."""
    p = list(mix.values()) if isinstance(mix, dict) else list(mix or [])
    if not p:
        return math.nan, math.nan
    m = len(p)
    return max(p) / max(min(p), 1e-12), 0.5 * sum(abs(x - 1 / m) for x in p)


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[int, int, float | None]:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return sum(d < 0 for d in diffs), len(seeds), (statistics.fmean(diffs) if diffs else None)


def table(base: dict[str, Any], variants: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    strat = {arm: {r["seed"]: r["heldout_uniform"] for r in base["runs"] if r["arm"] == arm and r.get("ok")}
             for arm in ("stratified/original", "stratified/regrouped")}
    rows = []
    for name, res in variants.items():
        for arm in RNB_ARMS:
            mine = [r for r in res["runs"] if r["arm"] == arm and r.get("ok")]
            if not mine:
                continue
            losses = {r["seed"]: r["heldout_uniform"] for r in mine}
            spreads = [_mixture_spread(r.get("final_mixture")) for r in mine]
            row = {"variant": name, "arm": arm, "n": len(mine),
                   "heldout_mean": statistics.fmean(losses.values()),
                   "heldout_std": statistics.stdev(losses.values()) if len(losses) > 1 else 0.0,
                   "ratio_max_min": statistics.fmean(s[0] for s in spreads),
                   "tv_from_uniform": statistics.fmean(s[1] for s in spreads),
                   "overhead_share": statistics.fmean(r["overhead_share"] for r in mine),
                   "settings": res["settings"]}
            for other in ("stratified/original", "stratified/regrouped"):
                w, n, d = _paired(losses, strat[other])
                row[f"vs {other}"] = {"wins": w, "seeds": n, "mean_diff": d}
            rows.append(row)
    s0 = base["settings"]
    lines = [f"R&B variants on fortunes, reduced setting ({s0['steps']} steps × {s0['batch_size'] * s0['workers']} "
             f"examples, base: λ = {s0['lam']:g}, {s0['update_every']}-step rounds, capture {s0['capture']}, "
             f"exact gradients); each compared, paired by seed, with the base run's stratified arms "
             f"(stratified/original {_ms(strat['stratified/original'])}, "
             f"stratified/regrouped {_ms(strat['stratified/regrouped'])}). Lower loss is better; "
             "Δ = mean paired difference (negative: R&B better).", "",
             "| variant | arm | held-out loss | Δ vs strat/orig (wins) | Δ vs strat/regr (wins) "
             "| final p max/min | TV(p, uniform) | overhead / train time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for other in ("stratified/original", "stratified/regrouped"):
            v = r[f"vs {other}"]
            cells.append("—" if v["mean_diff"] is None else f"{v['mean_diff']:+.4f} ({v['wins']}/{v['seeds']})")
        lines.append(f"| {r['variant']} | {r['arm']} | {r['heldout_mean']:.4f} ± {r['heldout_std']:.4f} | "
                     f"{cells[0]} | {cells[1]} | {r['ratio_max_min']:.2f} | {r['tv_from_uniform']:.3f} | "
                     f"{100 * r['overhead_share']:.1f}% |")
    return rows, "\n".join(lines)


def _ms(d: dict[int, float]) -> str:
    v = list(d.values())
    if not v:
        return "—"
    return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--table-only", action="store_true", help="do not train; rebuild the table from results")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    base_path = RESULTS / "fidelity.json"
    if not base_path.is_file():
        print(f"error: {base_path} is missing: run `python benchmarks/fidelity.py --quick --arms all "
              f"--seeds {args.seeds}` first (its stratified runs are the baselines)", file=sys.stderr)
        return 2
    base = json.loads(base_path.read_text())
    if not args.table_only:
        import fidelity

        common = ["--quick", "--seeds", args.seeds, "--k", str(base["regroup"]["k"])]
        for name in names:
            if name == "base":
                continue
            print(f"=== variant {name}: {' '.join(VARIANTS[name])}", flush=True)
            fidelity.main([*common, "--arms", ",".join(RNB_ARMS), "--tag", f"_{name}", *VARIANTS[name]])
    results = {"base": base}
    for name in names:
        p = RESULTS / f"fidelity_{name}.json"
        if name != "base" and p.is_file():
            results[name] = json.loads(p.read_text())
    rows, md = table(base, results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fidelity_investigation.json").write_text(json.dumps(rows, indent=2, default=str))
    (RESULTS / "fidelity_investigation.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
