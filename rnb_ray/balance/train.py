"""R&B mixture training on Ray Train: the per-worker loop and the ``TorchTrainer`` wiring.

Library API (the CLI ``rnb train``, ``jobs/train.py`` and the sweep all call these):

* ``train(cfg: TrainConfig) -> TrainResult`` — validates, plans the data, creates the run directory and
  the run's mixer actor, runs a ``TorchTrainer`` with ``cfg.workers`` DDP workers (gloo on CPU, nccl on
  GPU), then writes ``mixture.json`` and ``result.json``. Resumes with ``cfg.resume = RUN``. Raises
  ``RnbError`` for anything a user can fix — before any Ray work where possible.
* ``run_training_loop(cfg, *, plan=None, mixer=None, report=None) -> dict`` — the same loop in the
  calling process, one worker, no ``TorchTrainer`` and no torch.distributed (for a Ray Tune trainable:
  pass ``report=lambda row: tune.report(row)``; it is called with every ``metrics.jsonl`` row). The mixer
  is then a local object (no actor); checkpoints go to ``RUN/checkpoints/local/``. It writes the same run
  directory (call ``finish_run`` afterwards, or use ``train_in_process``) and returns the summary.
* ``train_in_process(cfg) -> TrainResult`` — ``run_training_loop`` plus the run-directory bookkeeping.

The loop, per step: draw each example's domain from p (``DomainSampler``), forward, backward — the
captured layers' weight gradients are formed one GEMM per domain inside the ordinary backward and added
to per-domain sums on the way (``DomainGradCapture``) — and step the optimizer. Every K steps a round
ends: each worker sends its sums and counts to the mixer, which answers with the next p (or, with
``stale``, the answer is applied one round later so the mixer is never waited for). Only strategies
that ask for it get the extra evaluation passes (``needs_eval_grad``, ``needs_eval_losses``); their
cost is accounted in ``extra_flops``/``extra_seconds``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnb_ray.balance.capture import DomainGradCapture, find_capture_modules
from rnb_ray.balance.config import TrainConfig, resolve_resume
from rnb_ray.balance.lm import (
    build_model,
    check_model_source,
    grad_token_mask,
    load_tokenizer,
    matmul_params,
    per_example_loss,
)
from rnb_ray.balance.mixer import Mixer, MixerSpec, build_strategy, create_mixer, load_state, save_state
from rnb_ray.balance.plan import ChunkReader, Plan, prepare_plan, worker_eval_set, worker_streams
from rnb_ray.balance.sampler import DomainSampler
from rnb_ray.config import save_config
from rnb_ray.errors import RnbError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run returns; everything is also in ``RUN/result.json`` and ``RUN/mixture.json``."""

    run_dir: Path
    final_eval_loss: float
    final_train_loss: float
    eval_loss_by_domain: dict[str, float]
    mixture: dict[str, float]
    steps: int
    summary: dict[str, Any] = field(default_factory=dict)


# ============================================================================ setup shared by both modes
def make_spec(cfg: TrainConfig, plan: Plan, num_workers: int) -> MixerSpec:
    options = dict(cfg.strategy_options or {})
    if cfg.strategy == "rnb":
        options.setdefault("lam", cfg.lam)
    if cfg.strategy == "static":
        assert plan.static_weights is not None
        options["weights"] = plan.static_weights.tolist()
    return MixerSpec(run_dir=str(cfg.run_dir), domains=plan.domains, strategy=cfg.strategy, options=options,
                     sizes=plan.sizes.tolist(), q=plan.q.tolist(), floor=cfg.floor, num_workers=num_workers,
                     lam=cfg.lam, debug_dump_rounds=cfg.debug_dump_rounds)


def _prepare_run(cfg: TrainConfig, num_workers: int) -> tuple[TrainConfig, Plan, MixerSpec, dict[str, bool]]:
    """Everything checkable before Ray work: settings, data, strategy options, model, run directory."""
    cfg = resolve_resume(cfg.validate())
    plan = prepare_plan(cfg)
    spec = make_spec(cfg, plan, num_workers)
    strategy = build_strategy(spec)
    flags = {k: bool(getattr(strategy, k)) for k in ("needs_train_grads", "needs_eval_grad", "needs_eval_losses")}
    check_model_source(cfg.model)
    load_tokenizer(cfg.model, cfg.tokenizer)
    run = cfg.run_dir
    if cfg.resume:
        if not any((run / "checkpoints").rglob("checkpoint_*")):
            raise RnbError(f"{run} has no checkpoint to resume from", where="--resume",
                           fix="set --checkpoint-every on the first run, or start a new run")
    elif run.exists() and any(run.iterdir()):
        raise RnbError(f"output directory {run} already exists and is not empty", where="--output",
                       fix="choose a new --output, or continue that run with --resume")
    for w in plan.warnings:
        log.warning(w)
        print(f"rnb train: warning: {w}", file=sys.stderr)
    return cfg, plan, spec, flags


def _start_run_dir(cfg: TrainConfig) -> None:
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        save_config(cfg, run / "config.json")


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))  # cosine to 10%

    return f


# ============================================================================ execution contexts
class _LocalContext:
    """One process, no torch.distributed; checkpoints under RUN/checkpoints/local/."""

    rank, world = 0, 1

    def __init__(self, cfg: TrainConfig, report):
        self.cfg = cfg
        self.report_fn = report
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.ckpt_root = cfg.run_dir / "checkpoints" / "local"

    def prepare_model(self, model):
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def no_sync(self, model):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def checkpoint_dir(self):
        cks = sorted(self.ckpt_root.glob("checkpoint_*")) if self.ckpt_root.is_dir() else []
        if not cks:
            yield None
        else:
            yield cks[-1]

    def save_checkpoint(self, src: Path | None, step: int, metrics: dict[str, Any]) -> None:
        assert src is not None
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        dst = self.ckpt_root / f"checkpoint_{step:09d}"
        tmp = self.ckpt_root / f".tmp_{step:09d}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        for old in sorted(self.ckpt_root.glob("checkpoint_*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    def report(self, row: dict[str, Any]) -> None:
        if self.report_fn is not None:
            self.report_fn(row)


class _RayTrainContext:
    """Inside a TorchTrainer worker."""

    def __init__(self, cfg: TrainConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def no_sync(self, model):
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    @contextlib.contextmanager
    def checkpoint_dir(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as d:
                yield Path(d)

    def save_checkpoint(self, src: Path | None, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(src)) if src is not None else None
        ray.train.report(metrics, checkpoint=ckpt)  # a barrier across workers

    def report(self, row: dict[str, Any]) -> None:
        pass  # rows go to metrics.jsonl through the mixer; Ray Train V2 does not keep metric-only reports


# ============================================================================ mixer access
class _ActorMixer:
    def __init__(self, name: str, timeout: float):
        import ray

        self.ray = ray
        self.name = name
        self.handle = ray.get_actor(name)
        self.timeout = timeout

    def call(self, method: str, *args: Any) -> Any:
        return self._get(getattr(self.handle, method).remote(*args), f"mixer.{method}")

    def submit(self, rank: int, round_: int, step: int, payload: dict[str, Any]) -> Any:
        return self.handle.submit.remote(rank, round_, step, payload)

    def wait(self, ref: Any, round_: int) -> dict[str, Any]:
        return self._get(ref, f"mixing round {round_}")

    def log(self, row: dict[str, Any]) -> None:
        self.handle.log.remote(row)

    def _get(self, ref: Any, what: str) -> Any:
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return self.ray.get(ref, timeout=self.timeout)
        except GetTimeoutError:
            try:
                pending = self.ray.get(self.handle.pending.remote(), timeout=10)
            except Exception:  # noqa: BLE001 — only for the message
                pending = "unknown (the mixer does not answer)"
            raise RnbError(f"{what} did not complete within {self.timeout:g}s (contributions received per "
                           f"round: {pending}); a worker is probably dead or stuck", where=f"mixer {self.name}",
                           fix="check the worker logs; raise --round-timeout-s for very slow steps") from None
        except RayActorError as e:
            raise RnbError(f"the mixer actor {self.name} died and could not be restarted: {e}",
                           fix="check RUN/mixer/ and the Ray logs; resume the run with --resume") from None


class _LocalMixer:
    def __init__(self, mixer: Mixer):
        self.mixer = mixer

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.mixer, method)(*args)

    def submit(self, rank: int, round_: int, step: int, payload: dict[str, Any]) -> Any:
        import asyncio

        return asyncio.run(self.mixer.submit(rank, round_, step, payload))

    def wait(self, ref: Any, round_: int) -> dict[str, Any]:
        return ref

    def log(self, row: dict[str, Any]) -> None:
        self.mixer.log(row)


# ============================================================================ the worker loop
@dataclass
class _Totals:
    """Cumulative counters (this worker); restored from checkpoints so they span resumes."""

    seconds_train: float = 0.0
    seconds_capture: float = 0.0
    seconds_mixer: float = 0.0
    extra_seconds: float = 0.0
    tokens: float = 0.0  # non-padding tokens
    tokens_padded: float = 0.0  # tokens processed
    flops_capture: float = 0.0
    extra_flops: float = 0.0


def _tokenize(tok, texts: list[str], seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _evaluate(model, tok, eval_texts: list[list[str]], cfg: TrainConfig, ctx, n_params: int
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-domain (loss sum, example count) over all workers, and this worker's forward FLOPs."""
    m = len(eval_texts)
    acc = torch.zeros(2 * m, dtype=torch.float64, device=ctx.device)
    flops = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for d, texts in enumerate(eval_texts):
            for i in range(0, len(texts), cfg.batch_size):
                ids, am = _tokenize(tok, texts[i: i + cfg.batch_size], cfg.seq_len, ctx.device)
                losses = per_example_loss(model(input_ids=ids, attention_mask=am).logits, ids, am)
                acc[d] += losses.double().sum()
                acc[m + d] += len(losses)
                flops += 2.0 * n_params * ids.numel()
    model.train(was_training)
    acc = ctx.all_reduce(acc).cpu().numpy()
    return acc[:m], acc[m:], flops


def _eval_summary(sums: np.ndarray, counts: np.ndarray, domains: list[str]) -> tuple[float, dict[str, float]]:
    by = {d: float(s / c) for d, s, c in zip(domains, sums, counts, strict=True) if c > 0}
    return float(np.mean(list(by.values()))) if by else float("nan"), by


def run_training_loop(cfg: TrainConfig, *, plan: Plan | None = None, mixer: Any = None, report=None,
                      flags: dict[str, bool] | None = None, _ray_train: bool = False) -> dict[str, Any]:
    """The training loop of one worker (see the module docstring). Returns rank 0's summary."""
    ctx = _RayTrainContext(cfg) if _ray_train else _LocalContext(cfg, report)
    rank, world, device = ctx.rank, ctx.world, ctx.device
    if plan is None:
        plan = prepare_plan(cfg)
    if mixer is None:
        mixer = _LocalMixer(Mixer(make_spec(cfg, plan, 1)))
    if flags is None:
        s = build_strategy(make_spec(cfg, plan, world))
        flags = {k: bool(getattr(s, k)) for k in ("needs_train_grads", "needs_eval_grad", "needs_eval_losses")}
    m, B, K = plan.m, cfg.batch_size, cfg.update_every
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    model = build_model(cfg.model, vocab_size=len(tok), seq_len=cfg.seq_len, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_embd=cfg.n_embd, pad_token_id=tok.pad_token_id, seed=cfg.seed)
    n_params = matmul_params(model)
    capture = None
    if flags["needs_train_grads"] or flags["needs_eval_grad"]:
        try:
            modules = find_capture_modules(model, cfg.capture)
        except ValueError as e:
            raise RnbError(f"bad --capture {cfg.capture!r}: {e}", where="--capture",
                           fix="use head, last_block, head+last_block or linear module names") from e
        capture = DomainGradCapture(modules, m, sketch_dim=cfg.sketch_dim, seed=cfg.seed, device=device)
        mb = 4 * m * capture.dim / 2**20
        if rank == 0 and flags["needs_train_grads"] and mb > 64:
            # Measured on fortunes (40 domains, 4096x128 head): exact sums cost 28% of train time in the
            # round trip, a 4096-d sketch 4.6% with the same held-out loss (benchmarks/fidelity_investigate.py).
            log.warning("each worker sends %.0f MB of per-domain gradient sums per round (%d domains x %d "
                        "numbers); --sketch-dim 4096 cuts that to %.1f MB", mb, m, capture.dim,
                        4 * m * 4096 * len(modules) / 2**20)
    model = ctx.prepare_model(model)
    raw_model = getattr(model, "module", model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    reader = ChunkReader(plan.sources, plan.text_column)
    sampler = DomainSampler(worker_streams(plan, rank, world, cfg.seed, reader), seed=cfg.seed * 1009 + rank)
    eval_texts = worker_eval_set(plan, rank, world, reader)
    eval_pool = [(t, d) for d, texts in enumerate(eval_texts) for t in texts]  # for the evaluation gradient
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())

    # ---------------------------------------------------------------- restore
    start, totals, p, pending = 0, _Totals(), None, None
    mixer_state = None
    with ctx.checkpoint_dir() as ck:
        if ck is not None:
            state = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=True)
            if state["world"] != world:
                raise RnbError(f"the checkpoint was written by {state['world']} workers, this run has {world}",
                               where=str(ck), fix=f"resume with --workers {state['world']}")
            raw_model.load_state_dict(torch.load(ck / "model.pt", map_location=device, weights_only=True))
            opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location=device, weights_only=True))
            sched.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["samplers"][rank])
            torch.set_rng_state(state["torch_rng"][rank])
            start, p, pending = state["step"], np.asarray(state["p"]), state["pending_round"]
            totals = _Totals(**state["totals"][rank])
            mixer_state = load_state(ck / "mixer.pt")
    if rank == 0:
        mixer.call("restore", mixer_state, start)
    ctx.barrier()
    if p is None:
        p = np.asarray(mixer.call("current")["mixture"])

    # ---------------------------------------------------------------- loop
    last_eval: tuple[float, dict[str, float]] | None = None
    last_row: dict[str, Any] | None = None
    loss_sum, loss_n = 0.0, 0
    mixer_info = {"seconds": 0.0, "flops": 0, "skipped": None}
    round_ = start // K
    dumps = cfg.run_dir / "debug"
    model.train()
    end = cfg.stop_after if cfg.stop_after and start < cfg.stop_after else cfg.steps
    for step in range(start, end):
        t_step = time.perf_counter()
        cap_s0 = capture.seconds if capture else 0.0
        texts, doms = sampler.next_batch(p, B)
        if capture is not None and flags["needs_train_grads"]:
            order = np.argsort(doms, kind="stable")  # each domain's rows contiguous: capture copies nothing
            texts, doms = [texts[i] for i in order], np.asarray(doms)[order]
        ids, am = _tokenize(tok, texts, cfg.seq_len, device)
        if round_ < cfg.debug_dump_rounds:
            dumps.mkdir(parents=True, exist_ok=True)
            np.savez(dumps / f"round_{round_:04d}_step_{step:06d}_rank_{rank}.npz", input_ids=ids.cpu().numpy(),
                     attention_mask=am.cpu().numpy(), domains=doms)
            if rank == 0:  # the weights this step's gradients are taken at (identical on every rank)
                torch.save(raw_model.state_dict(), dumps / f"round_{round_:04d}_step_{step:06d}_model.pt")
        if capture is not None and flags["needs_train_grads"]:
            capture.begin(torch.as_tensor(doms), grad_token_mask(am), scale=B)
        with autocast:
            logits = model(input_ids=ids, attention_mask=am).logits
        loss = per_example_loss(logits, ids, am).mean()
        loss.backward()
        if capture is not None:
            capture.end()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += float(loss.detach())
        loss_n += 1
        totals.tokens += float(am.sum())
        totals.tokens_padded += float(ids.numel())
        cap_dt = (capture.seconds - cap_s0) if capture else 0.0
        totals.seconds_capture += cap_dt
        totals.seconds_train += time.perf_counter() - t_step - cap_dt
        done = step + 1

        # ------------------------------------------------------------ round boundary
        skipped = None
        if done % K == 0:
            payload, extra_s, extra_f = _round_payload(capture, flags, model, tok, cfg, ctx, eval_texts,
                                                       eval_pool, round_, n_params)
            totals.extra_seconds += extra_s
            totals.extra_flops += extra_f
            t0 = time.perf_counter()
            ref = mixer.submit(rank, round_, done, payload)
            if cfg.stale:
                if pending is not None:
                    res = mixer.wait(pending, round_ - 1) if not isinstance(pending, int) else mixer.call("result", pending)
                    p, skipped = np.asarray(res["mixture"]), res.get("skipped")
                    mixer_info = res
                pending = ref
            else:
                res = mixer.wait(ref, round_)
                p, skipped = np.asarray(res["mixture"]), res.get("skipped")
                mixer_info = res
            totals.seconds_mixer += time.perf_counter() - t0
            round_ += 1

        # ------------------------------------------------------------ evaluation
        final = done == cfg.steps
        stopping = done == end
        evaluated = False
        if done % cfg.eval_every == 0 or final:
            sums, counts, _ = _evaluate(model, tok, eval_texts, cfg, ctx, n_params)
            last_eval = _eval_summary(sums, counts, plan.domains)
            evaluated = True

        # ------------------------------------------------------------ logging
        if done % cfg.log_every == 0 or done % K == 0 or evaluated or stopping:
            vec = torch.tensor([loss_sum, loss_n, totals.tokens, totals.tokens_padded, totals.flops_capture
                                + (capture.flops if capture else 0), totals.extra_flops], dtype=torch.float64,
                               device=device)
            vec = ctx.all_reduce(vec).cpu().numpy()
            if rank == 0:
                row = {
                    "step": done, "round": round_, "train_loss": vec[0] / max(vec[1], 1),
                    "eval_loss": last_eval[0] if evaluated else None,
                    "eval_loss_by_domain": last_eval[1] if evaluated else None,
                    "mixture": [float(x) for x in p], "lr": sched.get_last_lr()[0],
                    "tokens": int(vec[2]), "tokens_processed": int(vec[3]),
                    "seconds_train": totals.seconds_train, "seconds_capture": totals.seconds_capture,
                    "seconds_mixer": totals.seconds_mixer, "extra_seconds": totals.extra_seconds,
                    "flops_train": 6.0 * n_params * vec[3],
                    "flops_balance": vec[4] + float(mixer_info.get("flops", 0)),
                    "extra_flops": vec[5], "skipped_update": skipped,
                }
                mixer.log(row)
                ctx.report(row)
                last_row = row
            loss_sum, loss_n = 0.0, 0

        # ------------------------------------------------------------ checkpoint
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stopping:
            _checkpoint(ctx, mixer, raw_model, opt, sched, sampler, totals, capture, p, pending, done, world,
                        rank, cfg.stale)
            if cfg.stale and pending is not None and not isinstance(pending, int):
                pending = round_ - 1  # resolved inside _checkpoint; fetch it by number from now on

    if capture is not None:
        capture.remove()
    summary: dict[str, Any] = {}
    if rank == 0:
        ev = last_eval or (float("nan"), {})
        summary = {"steps": end, "steps_planned": cfg.steps, "final_eval_loss": ev[0], "eval_loss_by_domain": ev[1],
                   "final_train_loss": last_row["train_loss"] if last_row else None}
        if last_row:
            summary.update({k: v for k, v in last_row.items()
                            if k.startswith(("seconds_", "flops_", "extra_", "tokens"))})
        ft = summary.get("flops_train")
        summary["balance_flops_ratio"] = summary.get("flops_balance", 0.0) / ft if ft else None
        summary.update({"workers": world, "strategy": cfg.strategy, "domains": plan.domains,
                        "n_params_matmul": n_params, "q_source": plan.q_source})
        mixer.call("set_summary", summary)
    return summary


def _round_payload(capture, flags, model, tok, cfg: TrainConfig, ctx, eval_texts, eval_pool, round_: int,
                   n_params: int) -> tuple[dict[str, Any], float, float]:
    payload: dict[str, Any] = {}
    counts = None
    if capture is not None:
        sums, counts = capture.take()
        if flags["needs_train_grads"]:
            payload["sums"] = sums
    if counts is None or not flags["needs_train_grads"]:
        counts = np.zeros(len(eval_texts), dtype=np.int64)
    payload["counts"] = counts
    t0, flops = time.perf_counter(), 0.0
    if flags["needs_eval_grad"] and capture is not None:
        # One batch of this worker's evaluation examples, forward+backward, gradients kept local.
        n = len(eval_pool)
        if n:
            start = (round_ * cfg.batch_size) % n
            batch = [eval_pool[(start + i) % n] for i in range(min(cfg.batch_size, n))]
            ids, am = _tokenize(tok, [t for t, _ in batch], cfg.seq_len, ctx.device)
            with ctx.no_sync(model):
                capture.begin(torch.zeros(len(batch), dtype=torch.long), grad_token_mask(am), scale=len(batch),
                              target="eval")
                per_example_loss(model(input_ids=ids, attention_mask=am).logits, ids, am).mean().backward()
                capture.end()
            model.zero_grad(set_to_none=True)
            flops += 6.0 * n_params * ids.numel()
        grad, count = capture.take_eval()
        payload["eval_grad"], payload["eval_count"] = grad, count
    if flags["needs_eval_losses"]:
        sums_, counts_, f = _evaluate(model, tok, eval_texts, cfg, ctx, n_params)
        # _evaluate all-reduces; send the global sums from rank 0's view divided evenly so the mixer's
        # sum over workers is the global sum.
        payload["eval_loss_sums"] = sums_ / ctx.world
        payload["eval_loss_counts"] = counts_ / ctx.world
        flops += f
    return payload, time.perf_counter() - t0, flops


def _checkpoint(ctx, mixer, raw_model, opt, sched, sampler, totals: _Totals, capture, p, pending, step: int,
                world: int, rank: int, stale: bool) -> None:
    pending_round = None
    if stale and pending is not None:
        if isinstance(pending, int):
            pending_round = pending
        else:
            res = mixer.wait(pending, -1)  # make sure the mixer state includes it (not applied yet)
            pending_round = int(res["round"])
    tot = dict(totals.__dict__)
    tot["flops_capture"] = totals.flops_capture + (capture.flops if capture else 0)
    states = ctx.gather({"sampler": sampler.state_dict(), "rng": torch.get_rng_state(), "totals": tot})
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="rnb-ckpt-") as tmp:
            d = Path(tmp)
            torch.save(raw_model.state_dict(), d / "model.pt")
            torch.save(opt.state_dict(), d / "optimizer.pt")
            trainer_state = {"step": step, "world": world, "p": list(map(float, p)), "pending_round": pending_round,
                             "scheduler": sched.state_dict(), "samplers": [s["sampler"] for s in states],
                             "torch_rng": [s["rng"] for s in states], "totals": [s["totals"] for s in states]}
            torch.save(trainer_state, d / "trainer.pt")  # read back with weights_only=True
            save_state(d / "mixer.pt", mixer.call("state_dict"))
            ctx.save_checkpoint(d, step, {"step": step})
    else:
        ctx.save_checkpoint(None, step, {"step": step})


# ============================================================================ drivers
def _train_fn(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    mixer = _ActorMixer(config["mixer"], config["cfg"].round_timeout_s)
    run_training_loop(config["cfg"], plan=config["plan"], mixer=mixer, flags=config["flags"], _ray_train=True)


def _result(cfg: TrainConfig, summary: dict[str, Any]) -> TrainResult:
    return TrainResult(run_dir=cfg.run_dir, final_eval_loss=float(summary.get("final_eval_loss", float("nan"))),
                       final_train_loss=float(summary.get("final_train_loss") or float("nan")),
                       eval_loss_by_domain=dict(summary.get("eval_loss_by_domain") or {}),
                       mixture=dict(summary.get("final_mixture") or {}), steps=int(summary.get("steps", 0)),
                       summary=summary)


def _failure_message(err: BaseException) -> str:
    """The most specific message inside a Ray Train failure (an RnbError from a worker if there is one)."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, exc in sorted(failures.items()):
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, RnbError):
                return f"worker {rank}: {seen}"
            cause = getattr(seen, "cause", None)
            seen = cause if isinstance(cause, BaseException) else seen.__cause__
        text = str(exc).strip().splitlines()
        return f"worker {rank}: {text[-1] if text else type(exc).__name__}"
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a Balance training run on Ray Train; see the module docstring.

    Connects to Ray if needed (``RAY_ADDRESS`` or a local Ray). The run directory gets ``config.json``,
    ``metrics.jsonl``, ``mixture.json``, ``result.json``, ``checkpoints/`` (Ray Train storage) and
    ``mixer/`` (the mixer's persisted state). On a multi-node cluster ``--output`` must be on storage
    every node can reach (as Ray Train requires for checkpoints).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rnb_ray.ray_env import connect, require_resources

    cfg, plan, spec, flags = _prepare_run(cfg, cfg.workers)
    connect(None)
    require_resources(cpus=0 if cfg.use_gpu else cfg.workers, gpus=cfg.workers if cfg.use_gpu else 0,
                      what=f"training with {cfg.workers} workers")
    _start_run_dir(cfg)
    t0 = time.perf_counter()
    name = f"rnb-mixer-{uuid.uuid4().hex[:12]}"
    handle = create_mixer(spec, name, max_restarts=max(5, cfg.max_failures + 1))
    try:
        ray.get(handle.ping.remote(), timeout=60)
        trainer = TorchTrainer(
            _train_fn,
            train_loop_config={"cfg": cfg, "plan": plan, "mixer": name, "flags": flags},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
            run_config=RunConfig(
                name="checkpoints", storage_path=str(cfg.run_dir),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        try:
            trainer.fit()
        except RnbError:
            raise
        except Exception as e:  # noqa: BLE001 — Ray Train wraps worker errors in its own types
            raise RnbError(f"training failed: {_failure_message(e)}", where=str(cfg.run_dir),
                           fix="see the message above; completed checkpoints can be continued with --resume") from e
        summary = ray.get(handle.finish.remote({"seconds_total": time.perf_counter() - t0}), timeout=120)
    finally:
        with contextlib.suppress(Exception):
            ray.kill(handle)
    return _result(cfg, summary)


def train_in_process(cfg: TrainConfig, *, report=None) -> TrainResult:
    """One worker in this process (no TorchTrainer): for Ray Tune trainables and quick experiments."""
    cfg, plan, spec, flags = _prepare_run(cfg, 1)
    _start_run_dir(cfg)
    t0 = time.perf_counter()
    mixer = Mixer(spec)
    run_training_loop(cfg, plan=plan, mixer=_LocalMixer(mixer), report=report, flags=flags)
    summary = mixer.finish({"seconds_total": time.perf_counter() - t0})
    return _result(cfg, summary)


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """``result.json`` of a finished run."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise RnbError(f"{run_dir} has no result.json (the run did not finish)", fix="resume it with --resume")
    return json.loads(path.read_text(encoding="utf-8"))
