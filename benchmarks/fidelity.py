"""Does R&B help on real text? The paper's comparison, on Debian's fortunes, at a 2-core scale.

Arms (same model, steps, batch, tokens and seeds in every arm; only the mixture differs):

1. ``stratified/original``  uniform over the fortune categories (the paper's main baseline)
2. ``natural/original``     proportional to category size
3. ``stratified/regrouped`` uniform over the regrouped domains (k-means on MiniLM embeddings)
4. ``rnb/original``         R&B over the categories
5. ``rnb/regrouped``        R&B over the regrouped domains
6–9. ``dga``, ``doge``, ``skillit``, ``aioli`` over the categories (the paper's baselines)

Metric: held-out loss (mean per-example next-token cross-entropy) of the final model on every held-out
category, and their uniform mean (the paper's setting). Reported as mean ± std over seeds, with the
number of seeds in which arm 5 beats arm 1 and arm 3 (paired by seed), and each arm's cost beyond
training: its Balance overhead (gradient capture + mixer + extra evaluation passes) in seconds and as a
share of training time, and its extra FLOPs as a share of the training FLOPs (6·N·tokens).

    python benchmarks/fidelity.py                 # full: 3 seeds, all arms
    python benchmarks/fidelity.py --quick         # reduced: fewer steps, arms 1/3/4/5, 1 seed
    python benchmarks/fidelity.py --arms rnb/original,stratified/original --seeds 0,1,2 --lam 5

Writes benchmarks/results/fidelity.json (every run, every category) and fidelity.md (the table).
Work files (corpus, regroup output, runs) go under runs/bench/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = ROOT / "runs" / "bench"

sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Arm:
    name: str
    strategy: str
    domains: str  # "original" | "regrouped"
    options: dict[str, Any] = field(default_factory=dict)


ARMS: dict[str, Arm] = {
    a.name: a
    for a in [
        Arm("stratified/original", "stratified", "original"),
        Arm("natural/original", "natural", "original"),
        Arm("stratified/regrouped", "stratified", "regrouped"),
        Arm("rnb/original", "rnb", "original"),
        Arm("rnb/regrouped", "rnb", "regrouped"),
        Arm("dga/original", "dga", "original"),
        Arm("doge/original", "doge", "original"),
        Arm("skillit/original", "skillit", "original"),
        Arm("aioli/original", "aioli", "original"),
    ]
}
QUICK_ARMS = ["stratified/original", "stratified/regrouped", "rnb/original", "rnb/regrouped"]


# ----------------------------------------------------------------------------------- pure aggregation
def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def wins(runs: list[dict], arm: str, other: str) -> dict[str, Any]:
    """Paired by seed: in how many seeds does ``arm`` have the lower uniform held-out loss than ``other``."""
    a = {r["seed"]: r["heldout_uniform"] for r in runs if r["arm"] == arm and r.get("ok")}
    b = {r["seed"]: r["heldout_uniform"] for r in runs if r["arm"] == other and r.get("ok")}
    seeds = sorted(set(a) & set(b))
    n = sum(a[s] < b[s] for s in seeds)
    diffs = [a[s] - b[s] for s in seeds]
    return {"arm": arm, "vs": other, "wins": n, "seeds": len(seeds),
            "mean_diff": statistics.fmean(diffs) if diffs else None}


def summarize(runs: list[dict], arms: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in arms:
        mine = [r for r in runs if r["arm"] == name and r.get("ok")]
        loss_m, loss_s = mean_std([r["heldout_uniform"] for r in mine])
        worst_m, _ = mean_std([r["heldout_worst"] for r in mine])
        ovh_m, _ = mean_std([r["overhead_share"] for r in mine])
        sec_m, _ = mean_std([r["overhead_seconds"] for r in mine])
        flop_m, _ = mean_std([r["extra_flops_share"] for r in mine])
        train_m, _ = mean_std([r["seconds_total"] for r in mine])
        rows.append({"arm": name, "n": len(mine), "failed": sum(1 for r in runs if r["arm"] == name and not r.get("ok")),
                     "heldout_mean": loss_m, "heldout_std": loss_s, "worst_category_mean": worst_m,
                     "overhead_seconds": sec_m, "overhead_share": ovh_m, "extra_flops_share": flop_m,
                     "seconds": train_m})
    return rows


def _f(x: float | None, nd: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{100 * x:.2g}%" if x < 0.01 else f"{100 * x:.1f}%"


def markdown(summary: list[dict], win_rows: list[dict], meta: dict[str, Any]) -> str:
    lines = [
        f"Fortunes: {meta['n_categories']} categories, {meta['n_train']} train / {meta['n_heldout']} held-out "
        f"entries; GPT-2-style LM {meta['model']}; {meta['steps']} steps × {meta['global_batch']} examples "
        f"(≤ {meta['seq_len']} tokens), round = {meta['update_every']} steps; regrouped k = {meta['k']}; "
        f"seeds {meta['seeds']}.",
        "",
        "| arm | held-out loss (uniform over categories) | worst category | overhead s | overhead / train time "
        "| extra FLOPs / train FLOPs | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    best = min((r["heldout_mean"] for r in summary if math.isfinite(r["heldout_mean"])), default=None)
    for r in summary:
        loss = f"{_f(r['heldout_mean'])} ± {_f(r['heldout_std'])}"
        if best is not None and r["heldout_mean"] == best:
            loss = f"**{loss}**"
        runs = f"{r['n']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(f"| {r['arm']} | {loss} | {_f(r['worst_category_mean'])} | {_f(r['overhead_seconds'], 1)} "
                     f"| {_pct(r['overhead_share'])} | {_pct(r['extra_flops_share'])} | {runs} |")
    if win_rows:
        lines.append("")
        for w in win_rows:
            d = "—" if w["mean_diff"] is None else f"{w['mean_diff']:+.4f}"
            lines.append(f"- {w['arm']} beats {w['vs']} in **{w['wins']} of {w['seeds']}** seeds "
                         f"(mean paired difference {d}).")
    return "\n".join(lines)



# ----------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    steps: int = 300
    batch_size: int = 16  # per worker
    workers: int = 2
    seq_len: int = 64
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    lr: float = 2e-3
    warmup_steps: int = 20
    update_every: int = 10
    val_per_category: int = 16  # held-out examples per category the strategies may look at (and q)
    lam: float = 3.0
    rnb_options: tuple = ()
    capture: str = "head"
    sketch_dim: int = 0
    sketch_kind: str = "gaussian"  # the kind the investigation's sketch4096 variant measured

    def train_args(self) -> dict[str, Any]:
        return dict(steps=self.steps, batch_size=self.batch_size, workers=self.workers, seq_len=self.seq_len,
                    n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, lr=self.lr,
                    warmup_steps=self.warmup_steps, update_every=self.update_every, eval_every=self.steps,
                    log_every=self.update_every, eval_max_per_domain=self.val_per_category, lam=self.lam,
                    capture=self.capture, sketch_dim=self.sketch_dim, sketch_kind=self.sketch_kind)


# ----------------------------------------------------------------------------------- data
def prepare_corpus(work: Path, seed: int) -> dict[str, Any]:
    """fortunes → train / val / test parquet (val: ≤ val_per_category per category, the rest is test)."""
    import fortunes  # benchmarks/fortunes.py

    data = work / "fortunes"
    if not (data / "manifest.json").is_file():
        fortunes.build(data, seed=seed)
    return json.loads((data / "manifest.json").read_text()) | {"dir": str(data)}


def split_heldout(data: Path, out: Path, per_category: int, seed: int) -> tuple[Path, Path]:
    """Split held-out per category into a small validation part (strategies, q) and the test part (metric)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    val_p, test_p = out / "val.parquet", out / "test.parquet"
    if val_p.is_file() and test_p.is_file():
        return val_p, test_p
    rows = pq.read_table(data / "heldout.parquet").to_pylist()
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    val, test = [], []
    for cat in sorted(by):
        items = sorted(by[cat], key=lambda r: r["id"])
        random.Random(f"{seed}:val:{cat}").shuffle(items)
        n_val = min(per_category, len(items) // 2)  # at least half of every category stays for the test
        val += items[:n_val]
        test += items[n_val:]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(val), val_p)
    pq.write_table(pa.Table.from_pylist(test), test_p)
    return val_p, test_p


def silhouette_of(regroup_out: Path, embeddings: Path, sample: int = 4000, seed: int = 0) -> float:
    """Cosine silhouette of a sample of the training embeddings under nearest-centroid labels: the library's
    (``regroup.clustering.silhouette_array``, as ``rnb sweep`` scores each k), on the embedding cache."""
    import numpy as np
    import pyarrow.parquet as pq

    from rnb_ray.regroup.clustering import silhouette_array
    from rnb_ray.regroup.embed import EMB_ROW_ID, EMBEDDING, embeddings_numpy

    table = pq.read_table(sorted(Path(embeddings).glob("*.parquet")) or embeddings)
    return silhouette_array(embeddings_numpy(table.column(EMBEDDING)), np.load(regroup_out / "centroids.npy"),
                            metric="cosine", sample_size=sample, seed=seed, row_ids=table.column(EMB_ROW_ID).to_numpy())


def regroup_corpus(train: Path, val: Path, work: Path, ks: list[int], seed: int) -> dict[str, Any]:
    """Regroup the training split for each candidate k (embeddings cached once), pick k by silhouette,
    and assign the validation split to that k's centroids (`rnb assign`)."""
    from rnb_ray.regroup.assign import assign
    from rnb_ray.regroup.config import RegroupConfig
    from rnb_ray.regroup.regroup import regroup

    scores: dict[int, dict[str, Any]] = {}
    for k in ks:
        out = work / f"regroup_k{k}"
        t0 = time.perf_counter()
        if not (out / "domains.json").is_file():
            res = regroup(RegroupConfig(output=str(out), input=str(train), text_column="text",
                                        domain_column="source", k=k, seed=seed, cache_dir=str(work / ".rnb-cache"),
                                        max_seq_length=128, embed_batch_size=64, overwrite=True))
            emb = res.embeddings
        else:
            emb = Path(json.loads((out / "domains.json").read_text())["embeddings"])
        scores[k] = {"silhouette": silhouette_of(out, emb), "seconds": time.perf_counter() - t0}
        print(f"  regroup k={k}: silhouette {scores[k]['silhouette']:.4f} ({scores[k]['seconds']:.0f} s)", flush=True)
    best = max(ks, key=lambda k: (scores[k]["silhouette"] if math.isfinite(scores[k]["silhouette"]) else -2))
    out = work / f"regroup_k{best}"
    val_assigned = work / f"val_assigned_k{best}"
    if not (val_assigned / "assignment.json").is_file():
        assign(out / "domains.json", val, val_assigned, overwrite=True)
    return {"k": best, "candidates": {str(k): v for k, v in scores.items()}, "dir": str(out),
            "val": str(val_assigned / "data")}


# ----------------------------------------------------------------------------------- evaluation
def evaluate_by_category(run: Path, test: Path, batch: int = 64) -> dict[str, float]:
    """Mean per-example loss of the run's final model on every test category: the run's own model, tokenizer
    and loss (``checkpoint.model_from_run``, ``step.evaluate``), so the figures follow any change to them."""
    import pyarrow.parquet as pq

    from rnb_ray.balance.checkpoint import model_from_run
    from rnb_ray.balance.step import evaluate

    model, tok, cfg = model_from_run(run)
    rows = pq.read_table(test, columns=["text", "source"]).to_pylist()
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r["text"])
    cats = sorted(by)
    acc, _ = evaluate(model, tok, [by[c] for c in cats], batch_size=batch, seq_len=cfg.seq_len, device="cpu")
    m = len(cats)
    return {c: float(acc[i] / acc[m + i]) for i, c in enumerate(cats)}


# ----------------------------------------------------------------------------------- one run
def same_finished_run(run: Path, cfg: Any) -> bool:
    """A finished run (result.json) whose saved config equals ``cfg``: the benchmark reuses it."""
    import dataclasses

    if not (run / "result.json").is_file() or not (run / "config.json").is_file():
        return False
    saved = json.loads((run / "config.json").read_text())
    ours = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return all(saved.get(k) == v for k, v in ours.items() if k not in ("output", "resume"))


def run_arm(arm: Arm, seed: int, s: Settings, paths: dict[str, Any], work: Path, options: dict,
            reuse: bool = True, tag: str = "") -> dict[str, Any]:
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.costs import mixing_seconds
    from rnb_ray.balance.train import train

    run = work / f"runs{tag}" / f"{arm.name.replace('/', '_')}_s{seed}"  # a tag keeps variants apart
    if arm.domains == "original":
        data, eval_data, dom = paths["train"], paths["val"], "source"
    else:
        data, eval_data, dom = paths["regroup_dir"], paths["val_assigned"], "domain"
    opts = dict(arm.options) | options.get(arm.strategy, {})
    cfg = TrainConfig(data=str(data), eval_data=str(eval_data), output=str(run), domain_column=dom,
                      strategy=arm.strategy, strategy_options=opts or None, tokenizer=str(paths["tokenizer"]),
                      seed=seed, **s.train_args())
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"arm": arm.name, "seed": seed, "strategy": arm.strategy, "domains": arm.domains,
                           "options": opts, "run": str(run)}
    try:
        if reuse and same_finished_run(run, cfg):
            summ = json.loads((run / "result.json").read_text())
            res = SimpleNamespace(summary=summ, final_eval_loss=summ.get("final_eval_loss"),
                                  final_train_loss=summ.get("final_train_loss"))
            rec["reused"] = True
        else:
            if run.exists():
                shutil.rmtree(run)
            res = train(cfg)
        by_cat = evaluate_by_category(run, paths["test"])
    except Exception as e:  # noqa: BLE001 - one failed arm must not lose the others; it is reported
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500], seconds_total=time.perf_counter() - t0)
        print(f"  {arm.name} seed {seed}: FAILED {rec['error']}", flush=True)
        return rec
    summ = res.summary
    train_s = summ.get("seconds_train") or float("nan")
    overhead_s = mixing_seconds(summ)
    flops_train = summ.get("flops_train") or float("nan")
    rec.update(
        ok=True,
        heldout_uniform=statistics.fmean(by_cat.values()),
        heldout_worst=max(by_cat.values()),
        heldout_by_category=by_cat,
        in_run_eval_loss=res.final_eval_loss,
        final_train_loss=res.final_train_loss,
        tokens=summ.get("tokens"),
        seconds_train=train_s,
        seconds_capture=summ.get("seconds_capture"),
        seconds_mixer=summ.get("seconds_mixer"),
        extra_seconds=summ.get("extra_seconds"),
        overhead_seconds=overhead_s,
        overhead_share=overhead_s / train_s if train_s else float("nan"),
        extra_flops_share=((summ.get("extra_flops") or 0) + (summ.get("flops_balance") or 0)) / flops_train,
        skipped_rounds=summ.get("skipped_rounds"),
        final_mixture=summ.get("final_mixture"),
        seconds_total=time.perf_counter() - t0,
    )
    print(f"  {arm.name} seed {seed}: held-out {rec['heldout_uniform']:.4f} (worst {rec['heldout_worst']:.3f}), "
          f"overhead {100 * rec['overhead_share']:.2f}% of train time, {rec['seconds_total']:.0f} s", flush=True)
    return rec


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="R&B fidelity benchmark on the fortunes corpus")
    ap.add_argument("--quick", action="store_true", help="reduced form: arms 1/3/4/5, 1 seed, fewer steps")
    ap.add_argument("--arms", default="", help=f"comma-separated arms or 'all' (default: all; quick: 1/3/4/5): "
                    f"{', '.join(ARMS)}")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--update-every", type=int, default=None)
    ap.add_argument("--lam", type=float, default=None, help="R&B λ")
    ap.add_argument("--capture", default=None, help="R&B parameter subset (head, last_block, ...)")
    ap.add_argument("--sketch-dim", type=int, default=None, help="sketch size (0: exact)")
    ap.add_argument("--sketch-kind", default=None, choices=["gaussian", "rowhash"],
                    help="sketch kind for --sketch-dim (default gaussian, as the investigation measured)")
    ap.add_argument("--k", default="", help="regrouped k, or comma-separated candidates picked by silhouette "
                    "(default 10,20,40; quick: 20)")
    ap.add_argument("--options", default="{}", help='JSON {strategy: {option: value}}, e.g. {"dga": {"eta": 0.5}}')
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--tag", default="", help="suffix for the result files (fidelity<tag>.json/.md)")
    ap.add_argument("--fresh", action="store_true", help="retrain every run (default: reuse a finished run "
                    "whose saved config is identical)")
    args = ap.parse_args(argv)

    s = Settings()
    if args.quick:
        s = Settings(steps=80, update_every=10, warmup_steps=10)
    over = {k: v for k, v in {"steps": args.steps, "update_every": args.update_every, "lam": args.lam,
                              "capture": args.capture, "sketch_dim": args.sketch_dim,
                              "sketch_kind": args.sketch_kind}.items()
            if v is not None}
    if over:
        s = Settings(**(s.__dict__ | over))
    arms = ([a.strip() for a in args.arms.split(",") if a.strip()] if args.arms != "all" else list(ARMS)) \
        or (QUICK_ARMS if args.quick else list(ARMS))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or ([0] if args.quick else [0, 1, 2])
    ks = [int(x) for x in args.k.split(",") if x.strip()] or ([20] if args.quick else [10, 20, 40])
    options = json.loads(args.options)

    import ray

    from rnb_ray.ray_env import connect

    t_all = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    manifest = prepare_corpus(work, seed=0)
    data = Path(manifest["dir"])
    val, test = split_heldout(data, work / "split", s.val_per_category, seed=0)
    paths: dict[str, Any] = {"train": data / "train.parquet", "val": val, "test": test,
                             "tokenizer": data / "tokenizer"}
    if not ray.is_initialized():
        connect(None)
    regroup_info: dict[str, Any] = {"k": None}
    t_reg = time.perf_counter()
    if any(ARMS[a].domains == "regrouped" for a in arms):
        print("regrouping the training split ...", flush=True)
        regroup_info = regroup_corpus(paths["train"], val, work, ks, seed=0)
        paths["regroup_dir"], paths["val_assigned"] = regroup_info["dir"], regroup_info["val"]
    regroup_seconds = time.perf_counter() - t_reg

    runs = []
    for seed in seeds:
        for name in arms:
            runs.append(run_arm(ARMS[name], seed, s, paths, work, options, reuse=not args.fresh, tag=args.tag))
    summary = summarize(runs, arms)
    win_rows = [wins(runs, a, b) for a, b in [("rnb/regrouped", "stratified/original"),
                                               ("rnb/regrouped", "stratified/regrouped"),
                                               ("rnb/original", "stratified/original")]
                if a in arms and b in arms]
    from run_all import machine

    meta = {"n_categories": manifest["n_categories"], "n_train": manifest["n_train"],
            "n_heldout": manifest["n_heldout"], "model": f"{s.n_layer}×{s.n_embd} (BPE {manifest.get('tokenizer_vocab_size')})",
            "steps": s.steps, "global_batch": s.batch_size * s.workers, "seq_len": s.seq_len,
            "update_every": s.update_every, "k": regroup_info["k"], "seeds": seeds}
    md = markdown(summary, win_rows, meta)
    result = {"quick": args.quick, "settings": s.__dict__, "arms": arms, "seeds": seeds, "options": options,
              "regroup": regroup_info, "regroup_seconds": regroup_seconds, "corpus": manifest,
              "summary": summary, "wins": win_rows, "runs": runs, "machine": machine(),
              "seconds_total": time.perf_counter() - t_all, "table_markdown": md}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fidelity{args.tag}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"fidelity{args.tag}.md").write_text(md + "\n")
    print(md)
    print(f"fidelity finished in {result['seconds_total']:.0f} s")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
