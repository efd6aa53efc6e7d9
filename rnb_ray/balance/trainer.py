"""The training loop of one Balance worker, read top to bottom in ``Trainer.train``.

Per step: draw each example's domain from p (``DomainSampler``), then ``step.train_step`` — forward,
backward (the captured layers' weight gradients are formed one GEMM per domain inside the ordinary backward
and added to per-domain sums: ``DomainGradCapture``), optimizer. Every K = ``update_every`` steps a round
ends: the workers reduce their sums among themselves and form the Gram matrix (``RoundReducer``), then each
sends the mixer the round's small terms (counts, G, evaluation terms), and the mixer answers with the next p (with ``stale`` the
answer is applied one round later, so the mixer is never waited for). Only strategies that ask for it get
the extra evaluation passes (``Needs``); their cost is accounted in ``extra_flops``/``extra_seconds``.
Rank 0 sends a ``metrics.jsonl`` row to the mixer at every round, evaluation and ``log_every`` step.

The same ``Trainer`` runs inside a Ray Train worker or alone in the calling process: the difference is the
``Runtime`` it is given (``balance/runtime.py``). ``run_training_loop`` is the in-process entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnb_ray.balance import checkpoint
from rnb_ray.balance.capture import DomainGradCapture, find_capture_modules, layer_shapes
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.gram import expected_sketch_error
from rnb_ray.balance.lm import load_tokenizer, matmul_params, model_for
from rnb_ray.balance.mixer import Mixer
from rnb_ray.balance.plan import Plan, SourceReader, worker_eval_set, worker_streams
from rnb_ray.balance.round_reduce import RoundReducer
from rnb_ray.balance.run_setup import RunSetup, setup_run
from rnb_ray.balance.runtime import LocalRuntime, PendingRound, Runtime
from rnb_ray.balance.sampler import DomainSampler
from rnb_ray.balance.sketch import CaptureChoice, choose_capture, frequent_rows
from rnb_ray.balance.step import (
    Batch,
    dump_batch,
    eval_grad_step,
    evaluate,
    next_batch,
    optimizer_for,
    token_counts,
    train_step,
)
from rnb_ray.balance.token_plan import TokenPlan, token_worker_data
from rnb_ray.errors import RnbError

log = logging.getLogger(__name__)


@dataclass
class Totals:
    """Cumulative counters (this worker); restored from checkpoints so they span resumes."""

    seconds_train: float = 0.0
    seconds_capture: float = 0.0
    seconds_mixer: float = 0.0
    seconds_reduce: float = 0.0
    seconds_reduce_sync: float = 0.0  # of seconds_reduce: waiting for the other workers at the round's start
    extra_seconds: float = 0.0
    tokens: float = 0.0  # non-padding tokens
    tokens_padded: float = 0.0  # tokens processed
    flops_capture: float = 0.0
    extra_flops: float = 0.0


class Trainer:
    """One worker: builds its model, optimizer, sampler and capture, then ``train()`` runs the loop."""

    def __init__(self, setup: RunSetup, rt: Runtime):
        cfg, plan = setup.cfg, setup.plan
        self.cfg, self.plan, self.needs, self.rt, self.mixer = cfg, plan, setup.needs, rt, rt.mixer
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.tok = load_tokenizer(cfg.model, cfg.tokenizer)
        model = model_for(cfg, self.tok)
        self.n_params = matmul_params(model)
        self.sampler, self.eval_texts = self._sampler(cfg.seed)
        self.choice: CaptureChoice | None = None
        self.capture = self._capture(model) if self.needs.capture else None
        self.reducer = (RoundReducer(rt, plan.m, self.capture.dim, self.capture.sketched_columns())
                        if self.capture is not None else None)
        self.train_capture = self.capture if self.needs.train_grads else None  # capture during training steps
        self.model = rt.prepare_model(model)
        self.raw_model = getattr(self.model, "module", self.model)
        self.opt, self.sched = optimizer_for(self.model, cfg)
        self.eval_pool = [t for texts in self.eval_texts for t in texts]  # for the evaluation gradient
        self.autocast = (torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16)
                         if cfg.precision == "bf16" else contextlib.nullcontext())
        # Loop state: the step reached, the mixture in use, the stale round not applied yet.
        self.step, self.round, self.totals = 0, 0, Totals()
        self.p: np.ndarray | None = None
        self.pending: PendingRound | None = None
        self.mixer_info: dict[str, Any] = {"seconds": 0.0, "flops": 0, "skipped": None}
        self.skipped: str | None = None
        self.loss_sum, self.loss_n = 0.0, 0
        self.last_eval: tuple[float, dict[str, float]] | None = None
        self.last_row: dict[str, Any] | None = None
        self.round_terms: dict[str, Any] = {}  # the last round's sketch error and bytes sent (metrics)

    def _sampler(self, seed: int) -> tuple[DomainSampler, list[list[str]]]:
        """This worker's sampler over every domain, and its share of the evaluation set."""
        cfg, plan, rt = self.cfg, self.plan, self.rt
        if isinstance(plan, TokenPlan):  # token shards: packed sequences (balance/token_plan.py)
            packers, eval_texts = token_worker_data(plan, rt.rank, rt.world, seed)
            return DomainSampler(packers, seed=seed * 1009 + rt.rank), eval_texts
        # each domain streamed from this worker's share of its row groups, through a shuffle buffer
        sampler = DomainSampler(worker_streams(plan, rt.rank, rt.world, seed, SourceReader(plan),
                                               buffer=cfg.shuffle_buffer), seed=seed * 1009 + rt.rank)
        return sampler, worker_eval_set(plan, rt.rank, rt.world, SourceReader(plan))

    def _token_counts(self, rows: int) -> torch.Tensor:
        """Token counts of a sample of the training data (``step.token_counts``, through a separate sampler with
        another seed, so the training stream is untouched), summed over workers so every worker keeps the same
        rows exact."""
        sampler, _ = self._sampler(self.cfg.seed + 7919)
        counts = token_counts(sampler, self.plan.m, self.cfg.batch_size, self.tok, self.cfg.seq_len, rows)
        return self.rt.all_reduce(counts.to(self.rt.device)).cpu()

    def _capture(self, model: torch.nn.Module) -> DomainGradCapture:
        cfg, m = self.cfg, self.plan.m
        try:
            modules = find_capture_modules(model, cfg.capture)
        except ValueError as e:
            raise RnbError(f"bad --capture {cfg.capture!r}: {e}", where="--capture",
                           fix="use head, last_block, head+last_block or linear module names") from e
        shapes = layer_shapes(modules)
        # A round adds into the rows of the domains it sees, at most batch_size × update_every of them per worker.
        slots = min(m, cfg.batch_size * cfg.update_every)
        self.choice = choose_capture(shapes, m, self.rt.world, int(cfg.capture_budget_mb * 2**20), cfg.sketch_dim,
                                     cfg.sketch_kind, slots=slots)
        k = self.choice.sketch_dim
        exact_rows: dict[str, torch.Tensor] = {}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_name = next((n for n, mod in modules.items() if mod is head), None)
        n_exact = int(k * cfg.sketch_frequent_rows)
        if k and cfg.sketch_kind == "rowhash" and head_name is not None and n_exact and self.needs.train_grads:
            (out_f, _), = layer_shapes({head_name: modules[head_name]})
            if k < out_f:  # the head is hashed: keep its most frequent tokens' rows exact
                t0 = time.perf_counter()
                exact_rows[head_name] = frequent_rows(self._token_counts(out_f), n_exact)
                self.choice = dataclasses.replace(self.choice, reason=self.choice.reason + (
                    f"; {exact_rows[head_name].numel()} most frequent tokens' rows exact "
                    f"({time.perf_counter() - t0:.1f} s to count them)"))
        if self.rt.rank == 0 and self.needs.train_grads:
            log.info("per-domain gradients: %s", self.choice.reason)
        cap = DomainGradCapture(modules, m, sketch_dim=k, seed=cfg.seed, device=self.rt.device,
                                sketch_kind=cfg.sketch_kind, exact_rows=exact_rows, slots=slots)
        self.sketch_dims = cap.effective_dims()
        return cap

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Restore (or start), run to ``steps`` (or ``stop_after``); returns rank 0's summary."""
        cfg, K = self.cfg, self.cfg.update_every
        self.restore()
        end = cfg.stop_after if cfg.stop_after and self.step < cfg.stop_after else cfg.steps
        self.round = self.step // K
        self.model.train()
        for step in range(self.step, end):
            t0, cap0 = time.perf_counter(), self._capture_seconds()
            batch = next_batch(self.sampler, self.p, cfg.batch_size, self.tok, cfg.seq_len, self.rt.device,
                               by_domain=self.train_capture is not None)
            if self.round < cfg.debug_dump_rounds:
                dump_batch(cfg.run_dir / "debug", self.round, step, self.rt.rank, batch, self.raw_model)
            loss = train_step(self.model, self.opt, self.sched, batch, capture=self.train_capture,
                              autocast=self.autocast)
            self._count_step(loss, batch, t0, cap0)
            self.step = done = step + 1
            self.skipped = self.end_round() if done % K == 0 else None
            evaluated = done % cfg.eval_every == 0 or done == cfg.steps
            if evaluated:
                self.last_eval = self.evaluate()
            if done % cfg.log_every == 0 or done % K == 0 or evaluated or done == end:
                self.log_row(evaluated)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end:
                self.save_checkpoint()
        if self.capture is not None:
            self.capture.remove()
        self.peak_rss_mb = self.rt.gather(_peak_rss_mb())  # every worker's peak memory, for the summary
        return self.summary(end) if self.rt.rank == 0 else {}

    def _capture_seconds(self) -> float:
        return self.capture.seconds if self.capture is not None else 0.0

    def _count_step(self, loss: torch.Tensor, batch: Batch, t0: float, cap0: float) -> None:
        self.loss_sum += float(loss)
        self.loss_n += 1
        self.totals.tokens += float(batch.attention_mask.sum())
        self.totals.tokens_padded += float(batch.input_ids.numel())
        cap_dt = self._capture_seconds() - cap0
        self.totals.seconds_capture += cap_dt
        self.totals.seconds_train += time.perf_counter() - t0 - cap_dt

    # ------------------------------------------------------------------ rounds
    def end_round(self) -> str | None:
        """Send this round's measurements; apply the mixer's answer (with ``stale``: the previous round's).
        Returns the reason the applied update was skipped, or None."""
        payload = self.round_payload()
        t0 = time.perf_counter()
        submitted = self.mixer.submit(self.rt.rank, self.round, self.step, payload)
        if self.cfg.stale:
            submitted, self.pending = self.pending, submitted
        skipped = None
        if submitted is not None:
            self.mixer_info = submitted.result()
            self.p, skipped = np.asarray(self.mixer_info["mixture"]), self.mixer_info.get("skipped")
        self.totals.seconds_mixer += time.perf_counter() - t0
        self.round += 1
        return skipped

    def round_payload(self) -> dict[str, Any]:
        """What the mixer needs from this round, reduced across workers here (``RoundReducer``): counts, G,
        evaluation terms — kilobytes, identical on every worker — plus the evaluation losses if asked."""
        cap, needs, m = self.capture, self.needs, self.plan.m
        payload: dict[str, Any] = {"counts": np.zeros(m, dtype=np.int64)}
        t0, flops = time.perf_counter(), 0.0
        eval_sum, eval_n = None, 0
        if needs.eval_grad and cap is not None:
            # One batch of this worker's evaluation examples, forward+backward, gradients kept local.
            n, B = len(self.eval_pool), self.cfg.batch_size
            if n:
                start = (self.round * B) % n
                texts = [self.eval_pool[(start + i) % n] for i in range(min(B, n))]
                tokens = eval_grad_step(self.model, cap, texts, self.tok, self.cfg.seq_len, self.rt.device,
                                        self.rt.no_sync(self.model))
                flops += 6.0 * self.n_params * tokens
            eval_sum, eval_n = cap.eval_sum, cap.eval_count
        if needs.eval_losses:
            acc, tokens = self._eval_sums()
            # Global sums (all-reduced) divided evenly, so the mixer's sum over workers is the global sum.
            payload["eval_loss_sums"] = acc[:m] / self.rt.world
            payload["eval_loss_counts"] = acc[m:] / self.rt.world
            flops += 2.0 * self.n_params * tokens
        self.totals.extra_seconds += time.perf_counter() - t0
        self.totals.extra_flops += flops
        if cap is not None and self.reducer is not None:
            dump = needs.train_grads and self.round < self.cfg.debug_dump_rounds
            r0, w0 = self.reducer.seconds, self.reducer.seconds_sync
            terms = self.reducer.reduce(cap.sums if needs.train_grads else None, cap.counts, eval_sum, eval_n,
                                        keep_means=dump, rows=cap.slot)
            cap.reset()
            if not needs.train_grads:
                terms["counts"] = np.zeros(m, dtype=np.int64)
            if dump:
                self._dump_means(terms["counts"])
            self.totals.seconds_reduce += self.reducer.seconds - r0
            self.totals.seconds_reduce_sync += self.reducer.seconds_sync - w0
            if self.rt.rank == 0:  # every worker holds the same terms; the mixer reads rank 0's
                payload.update(terms)
                if self.choice is not None and self.choice.sketch_dim and "gram" in terms:
                    payload["sketch_error"] = expected_sketch_error(terms["gram"], self.sketch_dims,
                                                                    terms.get("gram_sketched"))
        self.round_terms = {"sketch_gram_rel_error": payload.get("sketch_error"),
                            "bytes_to_mixer": _nbytes(payload),
                            "bytes_collective": self.reducer.bytes_collective if self.reducer is not None else 0}
        return payload

    def _dump_means(self, counts: np.ndarray) -> None:
        """Debug rounds: the reduced domain means over every column (``debug/round_<r>_grads.npz``)."""
        assert self.reducer is not None
        means = self.reducer.full_means()
        if self.rt.rank == 0 and means is not None:
            out = self.cfg.run_dir / "debug"
            out.mkdir(parents=True, exist_ok=True)
            np.savez(out / f"round_{self.round:04d}_grads.npz", counts=counts, grads=means)

    # ------------------------------------------------------------------ evaluation and logging
    def _eval_sums(self) -> tuple[np.ndarray, int]:
        acc, tokens = evaluate(self.model, self.tok, self.eval_texts, batch_size=self.cfg.batch_size,
                               seq_len=self.cfg.seq_len, device=self.rt.device)
        return self.rt.all_reduce(acc).cpu().numpy(), tokens

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """(mean over domains, uniform; {domain: loss}) over every worker's evaluation texts."""
        acc, _ = self._eval_sums()
        m = self.plan.m
        by = {d: float(s / c) for d, s, c in zip(self.plan.domains, acc[:m], acc[m:], strict=True) if c > 0}
        return float(np.mean(list(by.values()))) if by else float("nan"), by

    def log_row(self, evaluated: bool) -> None:
        """All workers add up their counters; rank 0 sends the row (``metrics.jsonl``)."""
        t = self.totals
        cap_flops = (self.capture.flops if self.capture is not None else 0) + (
            self.reducer.flops if self.reducer is not None else 0)
        vec = torch.tensor([self.loss_sum, self.loss_n, t.tokens, t.tokens_padded, t.flops_capture + cap_flops,
                            t.extra_flops], dtype=torch.float64, device=self.rt.device)
        vec = self.rt.all_reduce(vec).cpu().numpy()
        if self.rt.rank == 0:
            ev = self.last_eval if evaluated else None
            row = {
                "step": self.step, "round": self.round, "train_loss": vec[0] / max(vec[1], 1),
                "eval_loss": ev[0] if ev else None, "eval_loss_by_domain": ev[1] if ev else None,
                "mixture": [float(x) for x in self.p], "lr": self.sched.get_last_lr()[0],
                "tokens": int(vec[2]), "tokens_processed": int(vec[3]),
                "seconds_train": t.seconds_train, "seconds_capture": t.seconds_capture,
                "seconds_mixer": t.seconds_mixer, "seconds_reduce": t.seconds_reduce,
                "seconds_reduce_sync": t.seconds_reduce_sync,
                "extra_seconds": t.extra_seconds,
                "flops_train": 6.0 * self.n_params * vec[3],
                "flops_balance": vec[4] + float(self.mixer_info.get("flops", 0)),
                "extra_flops": vec[5], "skipped_update": self.skipped,
                "sketch_gram_rel_error": self.round_terms.get("sketch_gram_rel_error"),
                "bytes_to_mixer": self.round_terms.get("bytes_to_mixer", 0),
                "bytes_collective": self.round_terms.get("bytes_collective", 0),
            }
            self.mixer.log(row)
            self.rt.report(row)
            self.last_row = row
        self.loss_sum, self.loss_n = 0.0, 0

    def summary(self, end: int) -> dict[str, Any]:
        """Rank 0's summary (also handed to the mixer, which adds its own part to ``result.json``)."""
        ev = self.last_eval or (float("nan"), {})
        last = self.last_row
        summary: dict[str, Any] = {"steps": end, "steps_planned": self.cfg.steps, "final_eval_loss": ev[0],
                                   "eval_loss_by_domain": ev[1], "final_train_loss": last["train_loss"] if last else None}
        if last:
            summary.update({k: v for k, v in last.items() if k.startswith(("seconds_", "flops_", "extra_", "tokens"))})
        ft = summary.get("flops_train")
        summary["balance_flops_ratio"] = summary.get("flops_balance", 0.0) / ft if ft else None
        summary.update({"workers": self.rt.world, "strategy": self.cfg.strategy, "domains": self.plan.domains,
                        "n_params_matmul": self.n_params, "q_source": self.plan.q_source,
                        "capture": self.choice.as_dict() if self.choice is not None else None,
                        "peak_rss_mb_per_worker": self.peak_rss_mb})
        self.mixer.call("set_summary", summary)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def restore(self) -> None:
        """Continue from the runtime's latest checkpoint, if any; rank 0 restarts the mixer at that step."""
        mixer_state = None
        with self.rt.latest_checkpoint() as ck:
            if ck is not None:
                r = checkpoint.load(ck, model=self.raw_model, optimizer=self.opt, rank=self.rt.rank,
                                    world=self.rt.world, device=self.rt.device)
                self.sched.load_state_dict(r.scheduler)
                try:
                    self.sampler.load_state_dict(r.worker.sampler)
                except ValueError as e:
                    raise RnbError(f"cannot continue this checkpoint's data streams: {e}", where=str(ck),
                                   fix="start a new run (checkpoints of older rnb-ray versions cannot resume)") from e
                torch.set_rng_state(r.worker.rng)
                self.step, self.p, self.totals = r.step, r.p, Totals(**r.worker.totals)
                if self.reducer is not None and r.worker.estimates is not None:
                    self.reducer.estimates.load_state_dict(r.worker.estimates)
                self.pending = None if r.pending_round is None else self.mixer.recorded(r.pending_round)
                mixer_state = r.mixer
        if self.rt.rank == 0:
            self.mixer.call("restore", mixer_state, self.step)
        self.rt.barrier()
        if self.p is None:
            self.p = np.asarray(self.mixer.call("current")["mixture"])

    def save_checkpoint(self) -> None:
        pending_round = None
        if self.pending is not None:
            self.pending.result()  # the mixer's saved state must include it (it is applied after the checkpoint)
            pending_round = self.pending.round
            self.pending = self.mixer.recorded(pending_round)  # read back by number from now on
        totals = asdict(self.totals)
        totals["flops_capture"] = self.totals.flops_capture + (self.capture.flops if self.capture is not None else 0) + (
            self.reducer.flops if self.reducer is not None else 0)
        estimates = self.reducer.estimates.state_dict() if self.reducer is not None else None
        mine = checkpoint.WorkerState(sampler=self.sampler.state_dict(), rng=torch.get_rng_state(), totals=totals,
                                      estimates=estimates)
        workers = self.rt.gather(mine)
        if self.rt.rank != 0:
            self.rt.save_checkpoint(None, self.step)
            return
        with tempfile.TemporaryDirectory(prefix="rnb-ckpt-") as tmp:
            checkpoint.save(Path(tmp), model=self.raw_model, optimizer=self.opt, scheduler=self.sched,
                            step=self.step, p=self.p, pending_round=pending_round, workers=workers,
                            mixer_state=self.mixer.call("state_dict"))
            self.rt.save_checkpoint(Path(tmp), self.step)


def run_training_loop(cfg: TrainConfig, *, plan: Plan | None = None,
                      report: Callable[[dict[str, Any]], None] | None = None,
                      records: bool = False) -> dict[str, Any]:
    """The loop in the calling process: one worker, no TorchTrainer, no torch.distributed, the mixer a
    local object (for a Ray Tune trainable: ``report`` gets every ``metrics.jsonl`` row). Writes the run
    directory's ``metrics.jsonl``, ``mixer/`` and ``checkpoints/local/``; with ``records`` also
    ``mixture.json`` and ``result.json``, as `rnb train` does. Returns the summary (with ``records``, the
    result.json one: the mixer's own seconds, FLOPs and final mixture added)."""
    t0 = time.perf_counter()
    setup = setup_run(cfg, 1, plan)
    mixer = Mixer(setup.spec)
    summary = Trainer(setup, LocalRuntime(cfg.run_dir, mixer, use_gpu=cfg.use_gpu, report=report)).train()
    return mixer.finish({"seconds_total": time.perf_counter() - t0}) if records else summary


def _nbytes(payload: dict[str, Any]) -> int:
    """Bytes of the arrays a round sends to the mixer (what crosses the object store, before pickling)."""
    return int(sum(np.asarray(v).nbytes for v in payload.values() if v is not None))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
