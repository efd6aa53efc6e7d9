"""Run the whole benchmark suite and regenerate the README's results table.

    python benchmarks/run_all.py            # full suite   (target: < 30 min on 2 cores)
    python benchmarks/run_all.py --quick    # reduced suite (target: < 5 min on 2 cores)
    make bench / make bench-quick

Runs, each as its own process (so one failing script does not stop the others; a crash is recorded):
``embed_throughput.py``, ``kmeans_bench.py``, ``balance_overhead.py``, ``tokens_bench.py``, ``data_path.py`` (training's data path at
200 k / 2 M / 20 M documents; --quick: 200 k / 2 M, ~1 min), ``sweep_layout.py`` and ``embed_backends.py``
(full suite only) and
``fidelity.py`` (five arms x 3 seeds at 80 steps; with --quick a 2-arm, 1-seed, 40-step smoke test).
Measured on the idle 2-core machine: full suite 1,203 s from a cold start (no cached corpus, embeddings or
runs); --quick 283 s when it still ran sweep_layout (54 s; now full suite only) with its smoke runs
reused — expect ~230 s, plus ~50 s the first time the two smoke runs train. Since then ``kmeans_bench.py`` gained
the k = 1,024 comparison with faiss-cpu at N = 1 M: the script took 402 s in the full suite's setting (1,143 s
while other jobs loaded the 2 cores), about a minute with --quick (N = 100,000). Every script writes ``benchmarks/results/<name>.json``; this script then writes
``benchmarks/results/suite.json`` (what ran, exit codes, seconds, machine) and rewrites the block between
``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md — nothing else in the README.

Table rows come from each result file: a ``"table"`` list of ``{"metric", "value", "baseline", "ratio",
"note"}`` rows when present, else a ``"ratios"`` mapping ``{label: ratio}``, else every number whose key
names a ratio; fidelity contributes its markdown table (``fidelity.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# (name, script, result json, args in the full suite, args in the reduced suite)
FIDELITY_ARMS = ["stratified/original", "natural/original", "stratified/regrouped", "rnb/original", "rnb/regrouped"]
FIDELITY_SMOKE = ["--quick", "--arms", "stratified/original,rnb/original", "--seeds", "0", "--steps", "40",
                  "--tag", "_smoke"]
SUITE: list[tuple[str, str, str, list[str], list[str] | None]] = [
    ("embedding throughput", "embed_throughput.py", "embed_throughput.json", ["--quick"],
     ["--quick", "--rounds", "1", "--no-previous"]),
    ("k-means", "kmeans_bench.py", "kmeans_bench.json", [], ["--quick"]),
    ("Balance overhead", "balance_overhead.py", "balance_overhead.json", ["--quick"],
     ["--quick", "--pairs", "1", "--sketch-runs", "0"]),
    ("sweep layout", "sweep_layout.py", "sweep_layout.json", [], None),  # full suite only (keeps --quick < 5 min)
    # Training's data path vs corpus size (200 k / 2 M / 20 M documents; --quick: 200 k / 2 M, one run each).
    ("training data path", "data_path.py", "data_path.json", ["--clean"], ["--quick", "--layouts", "regrouped"]),
    # Backends on fortunes (throughput vs torch, NMI/ARI of their domains vs torch's and vs the categories): a
    # 6,000-entry subset keeps it to ~4 min; the README's figures come from the whole train split (no --docs).
    ("embedding backends", "embed_backends.py", "embed_backends.json", ["--docs", "6000"], None),
    # Packed token shards vs raw text in the training loop, and `rnb tokenize` with 1 vs 2 Ray workers (issue 11).
    ("token shards and packing", "tokens_bench.py", "tokens_bench.json", [], ["--quick"]),
    # Full suite: the reduced fidelity setting (80 steps) for the five arms x 3 seeds; finished runs
    # with an identical config are reused. The four baselines (slower: evaluation passes) run on their own:
    # `fidelity.py --quick --arms all --seeds 0,1,2 --tag _baselines`. Reduced suite: 2 arms x 1 seed x 40
    # steps on the original categories (no regroup, so no corpus embedding).
    ("fidelity (R&B on fortunes)", "fidelity.py", "fidelity.json",
     ["--quick", "--arms", ",".join(FIDELITY_ARMS), "--seeds", "0,1,2", "--k", "20"], FIDELITY_SMOKE),
    # The paper's regime: multi-task instruction data (38 SNI-style tasks from Debian text), a pretrained small
    # model. Full suite: the five core arms x 5 seeds (finished runs are reused from runs/bench/mt; from a cold
    # start this is ~40 min on an idle 2-core machine). Reduced suite: 2 arms x 1 seed x 30 steps on a 1-layer
    # model pretrained for 100 steps (a smoke test of the whole path, not evidence).
    ("multi-task fidelity", "multitask.py", "multitask.json", ["--arms", "core", "--seeds", "0,1,2,3,4"],
     ["--quick"]),
]
# Markdown tables shown under the ratio table when present (fidelity.py / fidelity_investigate.py write them).
FIDELITY_TABLES: list[tuple[str, str]] = [
    ("fidelity.md", "**Fidelity**, reduced setting (held-out loss on fortunes, lower is better):"),
    ("fidelity_baselines.md", "The same setting with the paper's baselines (DGA, DoGE, Skill-It, Aioli):"),
    ("fidelity_long.md", "**Fidelity**, longer training (300 steps; the five arms):"),
    ("fidelity_investigation.md", "**Why R&B does or does not win here** (`benchmarks/fidelity_investigate.py`):"),
]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - machine details are best effort
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except Exception:  # noqa: BLE001
        pass
    return info


def run_script(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    path = HERE / script
    if not path.is_file():
        return {"status": "missing", "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    seconds = round(time.perf_counter() - t0, 1)
    sys.stdout.write(done.stdout)
    return {"status": "ok" if done.returncode == 0 else "failed", "returncode": done.returncode,
            "seconds": seconds, "stderr_tail": done.stderr[-2000:] if done.returncode else ""}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return "" if v is None else str(v)


def rows_from(result: dict[str, Any]) -> list[list[str]]:
    if isinstance(result.get("table"), list):
        return [[_fmt(r.get("metric")), _fmt(r.get("value")), _fmt(r.get("baseline")), _fmt(r.get("ratio")),
                 _fmt(r.get("note"))] for r in result["table"] if isinstance(r, dict)]
    if isinstance(result.get("ratios"), dict):
        return [[str(k), "", "", _fmt(v), ""] for k, v in result["ratios"].items()]
    return [[k, "", "", _fmt(v), ""] for k, v in _ratio_leaves(result)][:8]


def _ratio_leaves(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, float]]:
    """Fallback for result files without a table: every number whose key names a ratio (2 levels deep)."""
    out: list[tuple[str, float]] = []
    if not isinstance(obj, dict) or depth > 2:
        return out
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, int | float) and not isinstance(v, bool) and "ratio" in k.lower():
            out.append((name, float(v)))
        elif isinstance(v, dict):
            out.extend(_ratio_leaves(v, f"{name}.", depth + 1))
    return out


def render(statuses: dict[str, dict[str, Any]], quick: bool, info: dict[str, Any], render_only: bool = False) -> str:
    how = ("Assembled by `python benchmarks/run_all.py --render-only` from the result files present"
           if render_only else f"Generated by `python benchmarks/run_all.py{' --quick' if quick else ''}`")
    lines = [
        f"{how} on "
        f"{time.strftime('%Y-%m-%d')} — {info.get('cpus')} CPUs, {info.get('processor')}, "
        f"Python {info.get('python')}, torch {info.get('torch', '?')}, Ray {info.get('ray', '?')}"
        f"{', reduced suite' if quick else ''}. Raw numbers: `benchmarks/results/*.json`.",
        "",
        "| benchmark | metric | value | baseline | ratio | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, script, result_file, _, _ in SUITE:
        st = statuses.get(script, {})
        if script == "fidelity.py":
            continue
        path = RESULTS / result_file
        quick_file = RESULTS / result_file.replace(".json", "_quick.json")  # a script whose --quick writes apart
        if quick and not render_only and quick_file.is_file():
            path = quick_file
        rows = []
        if st.get("status") == "ok" and path.is_file():
            rows = rows_from(json.loads(path.read_text()))
        if not rows:
            lines.append(f"| {name} | *{st.get('status', 'not run')}* | | | | |")
        for r in rows:
            lines.append(f"| {name} | " + " | ".join(r) + " |")
    fid = statuses.get("fidelity.py", {})
    if quick and not render_only:
        smoke = RESULTS / "fidelity_smoke.md"
        lines += ["", "**Fidelity smoke test** (reduced suite: 2 arms, 1 seed, 40 steps — a check that it runs, "
                  "not evidence):", ""]
        lines.append(smoke.read_text().strip() if fid.get("status") == "ok" and smoke.is_file()
                     else f"*fidelity smoke test: {fid.get('status', 'not run')}*")
    shown = False
    for file, title in FIDELITY_TABLES:
        path = RESULTS / file
        if path.is_file():
            lines += ["", title, "", path.read_text().strip()]
            shown = True
    if not shown:
        lines += ["", f"*fidelity benchmark: {fid.get('status', 'not run')}*"]
    return "\n".join(lines)


def update_readme(block: str, readme: Path = ROOT / "README.md") -> bool:
    """Replace the text between the markers; False (README untouched) when the markers are absent."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return False
    new = pattern.sub(lambda _m: f"{START}\n{block}\n{END}", text, count=1)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(readme)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run every benchmark and refresh the README results table")
    ap.add_argument("--quick", action="store_true", help="the reduced suite (< 5 minutes)")
    ap.add_argument("--only", default="", help="comma-separated script names to run (default: all)")
    ap.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rebuild the README table from the result files already present")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    info = machine()
    statuses: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for name, script, result_file, full_args, quick_args in SUITE:
        if only and script not in only and script.removesuffix(".py") not in only:
            continue
        if args.quick and quick_args is None and not args.render_only:
            continue
        if args.render_only:
            present = (RESULTS / result_file).is_file()
            statuses[script] = {"status": "ok" if present else "not run", "seconds": 0.0, "reused": True}
            continue
        print(f"== {name} ({script})", flush=True)
        statuses[script] = run_script(script, quick_args if args.quick else full_args, timeout=1800)
        print(f"   -> {statuses[script]['status']} in {statuses[script]['seconds']} s", flush=True)
        if statuses[script].get("stderr_tail"):
            print(statuses[script]["stderr_tail"], file=sys.stderr)
    total = round(time.perf_counter() - t0, 1)
    suite = {"quick": args.quick, "seconds": total, "machine": info, "scripts": statuses}
    if not args.render_only:
        (RESULTS / "suite.json").write_text(json.dumps(suite, indent=2))
    block = render(statuses, args.quick, info, args.render_only)
    (RESULTS / "README_table.md").write_text(block + "\n")
    if not args.no_readme:
        if update_readme(block):
            print("README.md results table updated")
        else:
            print(f"README.md has no {START} ... {END} block; table left in benchmarks/results/README_table.md")
    print(f"suite finished in {total} s")
    return 0 if all(s["status"] in ("ok", "missing") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
