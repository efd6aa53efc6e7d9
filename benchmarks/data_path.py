"""Training's data path against corpus size (issue 11): driver peak memory and time to the first step.

    python benchmarks/data_path.py                 # 200 k, 2 M and 20 M documents
    python benchmarks/data_path.py --quick         # 200 k and 2 M, one repeat
    python benchmarks/data_path.py --old-src DIR   # also the data path of another checkout (its rnb_ray/), at
                                                   # the smallest size (--old-sizes), for context

Corpora: synthetic, 64 domains, 300-character texts, in two layouts: ``regrouped`` — what ``rnb regroup``
writes (``data/domain=<d>/part-0.parquet`` + ``domains.json``; planned from parquet statistics) — and
``column`` — one file with a ``domain`` column, the domains interleaved in every row group (as the issue
measured; planned by a domain-column scan). The text column is dictionary-encoded from a pool of 2,048
random texts (zstd), so 20 M documents take ~100 MB on disk and are written in seconds; a worker still
decodes full strings. Row groups of 65,536 rows. Cached under ``--cache-dir`` with a ``.complete`` marker;
``--clean`` deletes them at the end.

Each measurement is one training run of 2 steps (1 worker, byte tokenizer, log every step) in a fresh process.
Default (``--runner in-process``): ``run_training_loop``, the library call ``rnb train`` wraps minus Ray — the
plan, the one worker's streams and evaluation set, the model and the mixer all in that process, so its peak
RSS is the driver's *plus* a worker's and no Ray start-up (tens of seconds on a loaded machine) hides the data
path. ``--runner ray``: ``rnb train --workers 1`` itself (starts a local Ray). *Time to first step* = from
launching the process to the first row of ``metrics.jsonl`` (written when step 1 is done); *peak RSS* = the
process's ``VmHWM`` (with ``ray``, Ray's own processes and the worker are not counted). Also the plan alone (``prepare_plan``) in a fresh process: seconds,
pickled size, peak RSS. Ratios are against the smallest size of the same run; targets 20 M / 200 k: memory
≤ 1.2, time to first step ≤ 1.5. Results: ``benchmarks/results/data_path.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOMAINS, CHARS, POOL, ROW_GROUP = 64, 300, 2048, 65_536

# Run in a fresh interpreter: the CLI, then the driver's peak RSS (VmHWM) to a file.
TRAIN = """
import atexit, re, sys
def _peak():
    with open(sys.argv[1], "w") as f:
        f.write(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
atexit.register(_peak)
from rnb_ray.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""
# The same run in process (``run_training_loop``: the loop, the plan and the mixer in one process, no Ray):
# its peak RSS is the driver's plus one worker's, and no Ray start-up time hides the data path.
IN_PROCESS = """
import os, re, sys
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.trainer import run_training_loop
a = sys.argv[2:]
kw = {a[i].lstrip("-").replace("-", "_"): a[i + 1] for i in range(0, len(a), 2)}
def first_row(row):  # step 1 is done: record the peak RSS and stop (the rest of the run is not measured)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    os._exit(0)
run_training_loop(TrainConfig(data=kw["data"], output=kw["output"], steps=2, workers=1, tokenizer="byte",
                              log_every=1, eval_every=1000).validate(), report=first_row)
"""
PLAN = """
import json, pickle, re, sys, time
t0 = time.perf_counter()
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.plan import prepare_plan
t1 = time.perf_counter()
plan = prepare_plan(TrainConfig(data=sys.argv[1], output="unused").validate())
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "bytes": len(pickle.dumps(plan)), "units": len(plan.sources),
                  "how": getattr(plan, "domain_counts_from", None),
                  "peak_mib": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024}))
"""


def _pool(rng: np.random.Generator) -> pa.Array:
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    return pa.array([bytes(letters[rng.integers(0, len(letters), CHARS)]).decode() for _ in range(POOL)])


def make_corpus(n: int, cache: Path, layout: str = "regrouped") -> Path:
    """A corpus of ``n`` documents (cached): ``regrouped`` (one directory and file per domain, what ``rnb
    regroup`` writes) or ``column`` (one file, the domains interleaved in every row group)."""
    out = cache / f"{layout}-{n}"
    if (out / ".complete").is_file():
        return out / "corpus.parquet" if layout == "column" else out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    pool = _pool(rng)
    schema = pa.schema([("text", pa.dictionary(pa.int32(), pa.string())), ("domain", pa.int64())])
    if layout == "column":
        out.mkdir(parents=True)
        with pq.ParquetWriter(out / "corpus.parquet", schema, compression="zstd") as w:
            for start in range(0, n, ROW_GROUP):
                k = min(ROW_GROUP, n - start)
                idx = pa.array(rng.integers(0, POOL, k).astype(np.int32))
                w.write_table(pa.table({"text": pa.DictionaryArray.from_arrays(idx, pool),
                                        "domain": pa.array(rng.integers(0, DOMAINS, k))}, schema=schema),
                              row_group_size=ROW_GROUP)
        (out / ".complete").write_text(str(n))
        return out / "corpus.parquet"
    per = [n // DOMAINS + (d < n % DOMAINS) for d in range(DOMAINS)]
    for d, size in enumerate(per):
        part = out / "data" / f"domain={d}"
        part.mkdir(parents=True)
        with pq.ParquetWriter(part / "part-0.parquet", schema, compression="zstd") as w:
            for start in range(0, size, ROW_GROUP):
                k = min(ROW_GROUP, size - start)
                idx = pa.array(rng.integers(0, POOL, k).astype(np.int32))
                w.write_table(pa.table({"text": pa.DictionaryArray.from_arrays(idx, pool),
                                        "domain": pa.array(np.full(k, d, dtype=np.int64))}, schema=schema),
                              row_group_size=ROW_GROUP)
    (out / "domains.json").write_text(json.dumps({"k": DOMAINS, "n_documents": n,
                                                  "sizes": {str(d): s for d, s in enumerate(per)}}))
    (out / ".complete").write_text(str(n))
    return out


def _env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env.pop("RAY_ADDRESS", None)
    return env


def time_to_first_step(data: Path, src: Path, timeout: float, runner: str = "in-process") -> dict:
    with tempfile.TemporaryDirectory(prefix="rnb-dp-") as tmp:
        run, peak = Path(tmp) / "run", Path(tmp) / "peak"
        if runner == "ray":
            args = [sys.executable, "-c", TRAIN, str(peak), "--data", str(data), "--output", str(run), "--steps",
                    "2", "--workers", "1", "--tokenizer", "byte", "--log-every", "1", "--eval-every", "1000"]
        else:
            args = [sys.executable, "-c", IN_PROCESS, str(peak), "--data", str(data), "--output", str(run)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=tmp, env=_env(src), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = None
        metrics = run / "metrics.jsonl"
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            if first is None and (peak.is_file() or (metrics.is_file() and metrics.read_text().strip())):
                first = time.perf_counter() - t0
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
        total = time.perf_counter() - t0
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = total
        if proc.returncode != 0 or first is None:
            raise RuntimeError(f"rnb train failed ({proc.returncode}): {err[-2000:]}")
        return {"first_step_s": round(first, 2), "total_s": round(total, 2),
                "driver_peak_mib": round(int(peak.read_text()) / 1024, 1)}


def plan_only(data: Path, src: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="rnb-dp-") as tmp:  # not the checkout's cwd: PYTHONPATH decides
        done = subprocess.run([sys.executable, "-c", PLAN, str(data)], cwd=tmp, env=_env(src), capture_output=True,
                              text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _label(n: int) -> str:
    return f"{n // 1_000_000} M" if n >= 1_000_000 else f"{n // 1000} k"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 k and 2 M documents, one repeat")
    ap.add_argument("--sizes", default="", help="comma-separated document counts (default 200000,2000000,20000000)")
    ap.add_argument("--repeats", type=int, default=0, help="runs per size; the fastest counts (default 3, quick 1)")
    ap.add_argument("--cache-dir", default="/tmp/rnb-data-path-bench")
    ap.add_argument("--old-src", default="", help="a checkout whose rnb_ray/ to measure too (two smallest sizes)")
    ap.add_argument("--layouts", default="regrouped,column",
                    help="regrouped (a directory per domain) and/or column (one file, domains interleaved)")
    ap.add_argument("--runner", choices=["in-process", "ray"], default="in-process",
                    help="in-process: run_training_loop (plan, one worker and mixer in one process; default); "
                         "ray: `rnb train --workers 1` (starts a local Ray; its start-up dominates the time)")
    ap.add_argument("--old-sizes", type=int, default=1, help="how many of the smallest sizes --old-src runs")
    ap.add_argument("--clean", action="store_true", help="delete the generated corpora at the end")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s] or (
        [200_000, 2_000_000] if args.quick else [200_000, 2_000_000, 20_000_000])
    repeats = args.repeats or (1 if args.quick else 3)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"disk free under {cache}: {shutil.disk_usage(cache).free / 2**30:.1f} GiB", flush=True)

    layouts = [x for x in args.layouts.split(",") if x]
    corpora = {}
    for layout in layouts:
        for n in sizes:
            t0 = time.perf_counter()
            corpora[layout, n] = (make_corpus(n, cache, layout), time.perf_counter() - t0)
    # Repeats outside, sizes inside: a change in the machine's load hits every size alike; the fastest counts.
    runs: dict[tuple[str, int], list[dict]] = {k: [] for k in corpora}
    for _ in range(repeats):
        for k in corpora:
            runs[k].append(time_to_first_step(corpora[k][0], ROOT, args.timeout, args.runner))
            print(k, json.dumps(runs[k][-1]), flush=True)
    rows = []
    for (layout, n), (data, gen) in corpora.items():
        best = min(runs[layout, n], key=lambda r: r["first_step_s"])
        files_ = [data] if data.is_file() else list(data.rglob("*.parquet"))
        row = {"layout": layout, "documents": n, "corpus_mib": round(sum(f.stat().st_size for f in files_) / 2**20, 1),
               "generate_s": round(gen, 1), "first_step_s": best["first_step_s"],
               "driver_peak_mib": max(r["driver_peak_mib"] for r in runs[layout, n]), "runs": runs[layout, n],
               "plan": plan_only(data, ROOT)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    old = []
    if args.old_src:
        for n in sizes[:args.old_sizes]:
            data = corpora[layouts[0], n][0]
            r = time_to_first_step(data, Path(args.old_src), args.timeout, args.runner)
            r.update({"layout": layouts[0], "documents": n, "plan": plan_only(data, Path(args.old_src))})
            print("old:", json.dumps(r), flush=True)
            old.append(r)

    table, ratios = [], {}
    for layout in layouts:
        mine = [r for r in rows if r["layout"] == layout]
        base, top = mine[0], mine[-1]
        mem_ratio = top["driver_peak_mib"] / base["driver_peak_mib"]
        time_ratio = top["first_step_s"] / base["first_step_s"]
        ratios[layout] = {"memory": round(mem_ratio, 3), "time_to_first_step": round(time_ratio, 3),
                          "targets_met": mem_ratio <= 1.2 and time_ratio <= 1.5}
        span = f"{_label(top['documents'])} / {_label(base['documents'])}"
        table += [
            {"metric": f"{layout}: driver peak RSS, MiB ({span} documents)", "value": top["driver_peak_mib"],
             "baseline": base["driver_peak_mib"], "ratio": round(mem_ratio, 3), "note": "target <= 1.2"},
            {"metric": f"{layout}: time to first step, s ({span})", "value": top["first_step_s"],
             "baseline": base["first_step_s"], "ratio": round(time_ratio, 3),
             "note": "target <= 1.5; " + ("rnb train, includes starting Ray" if args.runner == "ray"
                                           else "in process: plan + 1 worker, no Ray; best of "
                                           f"{repeats}")},
            {"metric": f"{layout}: plan pickled into every worker, bytes ({span})", "value": top["plan"]["bytes"],
             "baseline": base["plan"]["bytes"], "ratio": round(top["plan"]["bytes"] / base["plan"]["bytes"], 3),
             "note": f"{top['plan']['units']} row groups; plan {top['plan']['seconds']:.1f} s"},
        ]
        print(f"{layout}: driver peak RSS {span}: {mem_ratio:.3f} (target <= 1.2); time to first step: "
              f"{time_ratio:.3f} (target <= 1.5)")
    for o in old:
        new = next(r for r in rows if r["documents"] == o["documents"] and r["layout"] == o["layout"])
        table.append({"metric": f"old data path, {o['layout']} {_label(o['documents'])}: driver peak MiB / first step s",
                      "value": f"{o['driver_peak_mib']} / {o['first_step_s']}",
                      "baseline": f"{new['driver_peak_mib']} / {new['first_step_s']}",
                      "ratio": round(o["first_step_s"] / new["first_step_s"], 2),
                      "note": "old (value) vs new (baseline); ratio of first-step times"})
    result = {"sizes": rows, "old": old, "ratios": ratios, "repeats": repeats, "quick": args.quick,
              "runner": args.runner, "load_average": [load0, os.getloadavg()], "table": table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_path.json").write_text(json.dumps(result, indent=2))
    if args.clean:
        for layout, n in corpora:
            shutil.rmtree(cache / f"{layout}-{n}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
