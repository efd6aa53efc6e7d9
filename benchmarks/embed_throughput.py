"""Embedding throughput: rnb-ray's Ray Data pipeline vs plain ``SentenceTransformer.encode``.

Same texts (the embedded stdlib-docstring corpus), same model (all-MiniLM-L6-v2), same total threads,
measured in one run, interleaved over ``--rounds`` rounds so load drift on a shared machine hits all sides:

1. baseline   — one process, ``model.encode(texts, batch_size=b)`` with ``torch.set_num_threads(T)``, for
                each b in ``--encode-batch-sizes``; the fastest is the baseline;
2. pipeline   — the regroup embedding step with ``embed_corpus``'s map_batches arguments (Ray Data batch =
                ``--batch-size``, ``Embedder`` actor pool) with A actors × 1 thread, A = T
                (target: ≥ 0.9 × baseline);
3. previous   — the same pipeline with the Embedder as it was before length sorting (one ``encode`` per
                Ray Data batch in corpus order), to show what the change bought;
4. scaling    — the pipeline with A actors × 1 thread vs 1 actor × 1 thread (target: ≥ 1.7×).

Pipeline throughput is steady state: documents / (last batch end − first batch start), read from
timestamps the actors record, so the one-off actor start (model load) is excluded — as it is for the
baseline, whose model is loaded before the clock starts. The actors also record the time spent inside the
model (``model_share_of_busy``) and the padding of each batching is counted from the real token lengths
(``padding``). The end-to-end time of ``embed_corpus`` (actor start and cache write included) is reported too.

    python benchmarks/embed_throughput.py            # full corpus (~2,200 documents)
    python benchmarks/embed_throughput.py --quick    # 500 documents

Writes benchmarks/results/embed_throughput.json (with the 1-minute load average before each measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts its workers at niceness 15; on a machine shared with other work that alone would starve the
# Ray side against a baseline at niceness 0. Both sides run at the same priority here.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rnb_ray.regroup.embed import Embedder  # noqa: E402


def _timed_model(emb: Embedder) -> None:
    """Wrap the actor's ``model.encode`` so the time spent in the model (tokenize + forward) is summed."""
    encode = emb.model.encode
    emb.model_seconds = 0.0

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return encode(*args, **kwargs)
        finally:
            emb.model_seconds += time.perf_counter() - t

    emb.model.encode = timed


def _stamp(emb: Embedder, out: pa.Table, t0: float, t1: float) -> pa.Table:
    """Per-batch wall-clock stamps and model seconds (on the batch's first row), for steady-state throughput."""
    import torch

    n = out.num_rows
    model_s = [emb.model_seconds] + [0.0] * (n - 1)
    emb.model_seconds = 0.0
    return (out.append_column("__t0", pa.array([t0] * n)).append_column("__t1", pa.array([t1] * n))
            .append_column("__model_s", pa.array(model_s)).append_column("__threads", pa.array([torch.get_num_threads()] * n)))


class TimedEmbedder(Embedder):
    """The production Embedder (length-sorted forward passes), plus timing columns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _timed_model(self)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.time()
        out = super().__call__(batch)
        return _stamp(self, out, t0, time.time())


class PreviousEmbedder(TimedEmbedder):
    """The Embedder before length sorting: one ``encode`` call over the batch in corpus order (for comparison)."""

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)


def baseline(texts: list[str], model, threads: int, batch_size: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model.encode(texts[:32], batch_size=batch_size)  # warm-up (first-call allocations)
    t = time.perf_counter()
    E = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    s = time.perf_counter() - t
    return {"threads": threads, "batch_size": batch_size, "seconds": s, "docs_per_s": len(texts) / s,
            "dim": int(E.shape[1]), "load_1min_before": os.getloadavg()[0]}


def pipeline(corpus_path: Path, model_path: str, actors: int, batch_size: int, max_tokens: int,
             previous: bool = False) -> dict:
    """The regroup embedding step as ``embed_corpus`` runs it (same map_batches arguments), timed per batch."""
    from ray.data import ActorPoolStrategy

    from rnb_ray.corpus import open_corpus
    from rnb_ray.ray_env import ordered_execution

    load = os.getloadavg()[0]
    corpus = open_corpus(corpus_path, "text")
    kwargs = {"model_path": model_path, "text_column": "text", "threads": 1, "batch_size": batch_size}
    if not previous:
        kwargs["max_tokens"] = max_tokens
    t = time.perf_counter()
    with ordered_execution():
        ds = corpus.dataset(columns=["text"]).map_batches(
            PreviousEmbedder if previous else TimedEmbedder,
            fn_constructor_kwargs=kwargs,
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1), num_cpus=1,
            batch_size=batch_size, batch_format="pyarrow",
        ).select_columns(["__t0", "__t1", "__model_s", "__threads"])
        stamps: set[tuple[float, float]] = set()
        n, model_s, threads = 0, 0.0, set()
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            # an actor's batch may arrive split or merged with others: its (t0, t1) stamp identifies it
            stamps.update(zip(b["__t0"].to_pylist(), b["__t1"].to_pylist(), strict=True))
            model_s += pa.compute.sum(b["__model_s"]).as_py()
            threads.update(b["__threads"].to_pylist())
            n += b.num_rows
    wall = time.perf_counter() - t
    steady = max(s[1] for s in stamps) - min(s[0] for s in stamps)
    busy, batches = sum(s[1] - s[0] for s in stamps), len(stamps)
    return {"actors": actors, "threads_per_actor": sorted(threads), "variant": "previous" if previous else "sorted",
            "documents": n, "batches": batches, "steady_seconds": steady, "docs_per_s": n / steady,
            "actor_busy_seconds": busy, "model_seconds": model_s,
            "model_share_of_busy": model_s / busy if busy else None,
            "busy_share_of_steady_x_actors": busy / (steady * actors),
            "wall_seconds_with_actor_start": wall, "load_1min_before": load}


def padding(texts: list[str], model, map_batch: int, batch_size: int, max_tokens: int, encode_batch: int) -> dict:
    """Real vs padded tokens of each way of batching the same texts (map batches = consecutive chunks)."""
    from rnb_ray.regroup.embed import length_batches, token_lengths

    lens = token_lengths(model, texts)
    chunks = [lens[i:i + map_batch] for i in range(0, len(lens), map_batch)]

    def padded(groups: list[np.ndarray]) -> int:
        return int(sum(len(g) * g.max() for g in groups if len(g)))

    def cut(sorted_lens: np.ndarray, size: int) -> list[np.ndarray]:
        return [sorted_lens[i:i + size] for i in range(0, len(sorted_lens), size)]

    real = int(lens.sum())
    # the previous Embedder: one encode() per map batch; encode sorts that batch by length, cuts batch_size
    previous = padded([g for c in chunks for g in cut(np.sort(c)[::-1], batch_size)])
    ours = padded([c[g] for c in chunks for g in length_batches(c, batch_size, max_tokens)])
    whole = padded(cut(np.sort(lens)[::-1], encode_batch))
    return {"real_tokens": real, "mean_tokens": float(lens.mean()), "max_tokens_per_doc": int(lens.max()),
            "padded_previous": previous, "padded_sorted": ours, "padded_encode_baseline": whole,
            "padding_factor_previous": previous / real, "padding_factor_sorted": ours / real,
            "padding_factor_encode_baseline": whole / real}


def end_to_end(corpus_path: Path, actors: int, batch_size: int) -> dict:
    """The real ``embed_corpus`` (reads, embeds, writes the cache), actor start included."""
    from rnb_ray.regroup.config import RegroupConfig
    from rnb_ray.regroup.regroup import embed_corpus

    tmp = Path(tempfile.mkdtemp(prefix="rnb-embed-bench-"))
    try:
        cfg = RegroupConfig(output=str(tmp / "out"), input=str(corpus_path), cache_dir=str(tmp / "cache"),
                            embed_actors=actors, embed_threads=1, embed_batch_size=batch_size)
        t = time.perf_counter()
        emb = embed_corpus(cfg)
        s = time.perf_counter() - t
        return {"actors": actors, "documents": emb.n, "seconds": s, "docs_per_s": emb.n / s}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def main() -> None:
    from rnb_ray.regroup.config import RegroupConfig
    from rnb_ray.regroup.embed import DEFAULT_MAX_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 documents instead of the whole corpus")
    ap.add_argument("--docs", type=int, default=None, help="number of documents (default: all, or 500 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="total threads/CPUs for each side (default 2)")
    ap.add_argument("--batch-size", type=int, default=RegroupConfig.__dataclass_fields__["embed_batch_size"].default,
                    help="pipeline: Ray Data batch and most documents per forward pass (default: regroup's)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help="pipeline: most padded tokens per forward pass (default: the Embedder's)")
    ap.add_argument("--encode-batch-sizes", default="16,32,64",
                    help="baseline encode() batch sizes; the fastest in each round is the baseline (default 16,32,64)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved baseline/pipeline rounds (default 2)")
    ap.add_argument("--no-previous", action="store_true", help="skip the previous (unsorted) Embedder")
    args = ap.parse_args()

    import ray
    from run_all import machine

    from rnb_ray.regroup.embed import load_model, resolve_model
    from rnb_ray.sample import write_sample_corpus

    tmp = Path(tempfile.mkdtemp(prefix="rnb-embed-corpus-"))
    full = pq.read_table(write_sample_corpus(tmp / "all.parquet"))
    n = args.docs or (500 if args.quick else full.num_rows)
    # spread the subset over every module (the corpus is sorted by module)
    idx = np.linspace(0, full.num_rows - 1, min(n, full.num_rows)).astype(int)
    table = full.take(pa.array(idx))
    corpus_path = tmp / "bench.parquet"
    pq.write_table(table, corpus_path)
    texts = table.column("text").to_pylist()
    model_path = resolve_model(None).path
    encode_sizes = [int(x) for x in args.encode_batch_sizes.split(",")]
    load_before = os.getloadavg()
    t_start = time.time()
    model = load_model(model_path, args.threads)
    pad = padding(texts, model, args.batch_size, args.batch_size, args.max_tokens, min(encode_sizes))
    print(f"padding: previous {pad['padding_factor_previous']:.2f}x real tokens, sorted "
          f"{pad['padding_factor_sorted']:.2f}x, encode() over all {pad['padding_factor_encode_baseline']:.2f}x", flush=True)

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    A = args.threads
    rounds: list[dict] = []
    for r in range(args.rounds):  # interleaved, so load drift hits every side alike
        row: dict = {"round": r, "baseline": [baseline(texts, model, args.threads, b) for b in encode_sizes]}
        row["sorted"] = pipeline(corpus_path, model_path, A, args.batch_size, args.max_tokens)
        if not args.no_previous:
            row["previous"] = pipeline(corpus_path, model_path, A, args.batch_size, args.max_tokens, previous=True)
        rounds.append(row)
        print(f"round {r}: encode " + ", ".join(f"b{x['batch_size']} {x['docs_per_s']:.1f}" for x in row["baseline"])
              + f" | pipeline {A}x1 sorted {row['sorted']['docs_per_s']:.1f}"
              + (f", previous {row['previous']['docs_per_s']:.1f}" if "previous" in row else "") + " docs/s", flush=True)
    one = pipeline(corpus_path, model_path, 1, args.batch_size, args.max_tokens)
    print(f"pipeline 1 actor x 1 thread (sorted): {one['docs_per_s']:.1f} docs/s", flush=True)
    e2e = end_to_end(corpus_path, A, args.batch_size)
    print(f"embed_corpus end to end (actor start included): {e2e['docs_per_s']:.1f} docs/s", flush=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    # per round: the fastest encode batch size is the baseline; ratios are per round, then the median
    base_rates = [max(x["docs_per_s"] for x in row["baseline"]) for row in rounds]
    sorted_rates = [row["sorted"]["docs_per_s"] for row in rounds]
    ratio = _median([s_ / b for s_, b in zip(sorted_rates, base_rates, strict=True)])
    base_rate, many_rate = _median(base_rates), _median(sorted_rates)
    scaling = many_rate / one["docs_per_s"]
    ratios = {"pipeline_vs_encode": ratio, f"{A}_actors_vs_1": scaling}
    if not args.no_previous:
        prev_rates = [row["previous"]["docs_per_s"] for row in rounds]
        ratios["previous_pipeline_vs_encode"] = _median([p_ / b for p_, b in zip(prev_rates, base_rates, strict=True)])
        ratios["sorted_vs_previous"] = _median([s_ / p_ for s_, p_ in zip(sorted_rates, prev_rates, strict=True)])
    result = {
        "benchmark": "embed_throughput",
        "quick": args.quick,
        "documents": len(texts),
        "mean_chars": float(np.mean([len(t) for t in texts])),
        "model": "all-MiniLM-L6-v2",
        "pipeline_batch_size": args.batch_size, "max_tokens": args.max_tokens, "encode_batch_sizes": encode_sizes,
        "padding": pad,
        "rounds": rounds,
        "pipeline_1x1": one, "end_to_end": e2e,
        "ratios": ratios,
        "targets": {"pipeline_vs_encode": 0.9, f"{A}_actors_vs_1": 1.7},
        "table": [
            {"metric": f"embedding docs/s, Ray Data pipeline ({A} actors × 1 thread, length-sorted passes)",
             "value": round(many_rate, 1),
             "baseline": f"{base_rate:.1f} (encode, {args.threads} threads)", "ratio": round(ratio, 2),
             "note": f"target ≥ 0.9; steady state (actor start excluded); median of {len(rounds)} interleaved rounds"},
            {"metric": f"embedding scaling: {A} actors × 1 thread vs 1 × 1",
             "value": round(many_rate, 1), "baseline": round(one["docs_per_s"], 1),
             "ratio": round(scaling, 2), "note": "target ≥ 1.7"},
            {"metric": "embed_corpus end to end docs/s (actor start + cache write included)",
             "value": round(e2e["docs_per_s"], 1), "baseline": f"{base_rate:.1f}",
             "ratio": round(e2e["docs_per_s"] / base_rate, 2), "note": f"{len(texts)} documents"},
        ],
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "seconds": time.time() - t_start,
        "machine": machine(),
    }
    if not args.no_previous:
        result["table"].insert(1, {
            "metric": "embedding docs/s, previous pipeline (batches in corpus order)",
            "value": round(_median(prev_rates), 1), "baseline": f"{base_rate:.1f}",
            "ratio": round(ratios["previous_pipeline_vs_encode"], 2),
            "note": f"padding {pad['padding_factor_previous']:.1f}× real tokens vs {pad['padding_factor_sorted']:.2f}× sorted"})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embed_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "targets": result["targets"],
                      "load_average": [load_before, result["load_average_after"]]}, indent=2))


if __name__ == "__main__":
    main()
