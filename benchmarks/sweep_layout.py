"""Sweep trial layout on a 2-CPU Ray: 2 trials × 1 CPU at a time vs 1 trial × 2 CPUs, and the pipeline demo.

The same 4-trial sweep (k = 2, 3, 4, 5, FIFO so every trial runs all steps) on the same corpus and embedding
cache, with (a) ``cpus_per_trial=1`` (two trials at once, one torch thread each) and (b)
``cpus_per_trial=2`` (one trial at a time, two torch threads). Reported: wall seconds of the Tune run
(embedding excluded: the cache is filled first), seconds per trial, and the ratio (b)/(a).

    python benchmarks/sweep_layout.py            # 1,000 documents, 40 steps per trial
    python benchmarks/sweep_layout.py --quick    # 360 documents, 10 steps per trial

Writes benchmarks/results/sweep_layout.json (with the machine's load average: on a shared machine the
absolute numbers move, the ratio much less).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"


def table_rows(res: dict) -> list[dict]:
    """The README row (run_all.py): Tune wall time of 1 trial × 2 CPUs over 2 trials × 1 CPU, same trials."""
    return [{"metric": "sweep wall time: 1 trial × 2 CPUs / 2 trials × 1 CPU",
             "value": res["one_trial_2cpu"]["seconds_tune"], "baseline": res["two_trials_1cpu"]["seconds_tune"],
             "ratio": res["ratio_one_trial_2cpu_over_two_trials_1cpu"],
             "note": f"{len(res['one_trial_2cpu']['trial_seconds'])} trials, {res['trial_steps']} steps each; "
                     "> 1: run trials side by side"}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.parquet as pq
    import ray

    from rnb_ray.ray_env import quiet_ray_logs
    from rnb_ray.sample import write_sample_corpus
    from rnb_ray.sweep.config import SweepConfig
    from rnb_ray.sweep.tune import run_sweep

    n_docs, steps = (360, 10) if args.quick else (1000, 40)
    tmp = Path(tempfile.mkdtemp(prefix="rnb-sweep-bench-"))
    full = pq.read_table(write_sample_corpus(tmp / "sample.parquet"))
    step = max(1, full.num_rows // n_docs)
    corpus = tmp / "corpus.parquet"
    pq.write_table(full.take(list(range(0, full.num_rows, step))[:n_docs]), corpus)
    quiet_ray_logs()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = dict(input=str(corpus), k=(2, 3, 4, 5), trial_steps=steps, eval_every=max(1, steps // 2),
                scheduler="fifo", cache_dir=str(tmp / "cache"), write_best=False, domain_column="source")
    out: dict = {"benchmark": "sweep_layout", "quick": args.quick, "documents": n_docs, "trial_steps": steps,
                 "machine": {"cpus_ray": 2, "nproc": os.cpu_count(), "python": platform.python_version(),
                             "load_avg_start": os.getloadavg()}}
    # Fill the embedding cache first so both layouts time only the Tune run.
    from rnb_ray.regroup.config import RegroupConfig
    from rnb_ray.regroup.regroup import embed_corpus

    t = time.perf_counter()
    embed_corpus(RegroupConfig(output=str(tmp / "unused"), input=str(corpus), cache_dir=str(tmp / "cache")))
    out["embed_seconds"] = time.perf_counter() - t
    for name, cpus in (("two_trials_1cpu", 1.0), ("one_trial_2cpu", 2.0)):
        doc = run_sweep(SweepConfig(**base, output=str(tmp / name), cpus_per_trial=cpus),
                        log=lambda s: None)
        out[name] = {"cpus_per_trial": cpus, "concurrent": doc["concurrent_trials"],
                     "seconds_tune": doc["seconds_tune"],
                     "trial_seconds": {t["k"]: t["seconds"] for t in doc["trials"]}}
        print(name, json.dumps(out[name]), flush=True)
    out["ratio_one_trial_2cpu_over_two_trials_1cpu"] = (out["one_trial_2cpu"]["seconds_tune"]
                                                        / out["two_trials_1cpu"]["seconds_tune"])
    out["machine"]["load_avg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    out["table"] = table_rows(out)
    (RESULTS / "sweep_layout.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
