"""The mixer: one named Ray actor per run that turns the workers' per-domain statistics into the next p.

Each round (every K = ``update_every`` steps) every worker calls ``submit(rank, round, step, payload)``
with the round's terms, already reduced among the workers with their own collectives
(``balance/round_reduce.py``): rank 0 sends the example counts, which domains are present, the Gram matrix G
over the domains' mean-gradient estimates and, when the strategy asks, the evaluation alignments ḡ_iᵀg_e;
every rank sends its share of the evaluation losses — kilobytes, never the gradients. When the
last worker's contribution arrives the mixer calls the strategy (R&B: p ← softmax(λ·Gq/‖Gq‖)), applies the
floor, records the round, persists its state, and answers every waiting worker with the same new p.

Fault tolerance:
* The actor is created with ``max_restarts`` and ``max_task_retries=-1``. After every round it writes its
  state to ``RUN/mixer/state.pt`` (atomically); a restarted actor reloads it, and the workers' in-flight
  ``submit`` calls are retried by Ray, so a killed mixer costs one round-trip, not the run. A ``submit``
  for a round already completed returns that round's result (idempotent).
* When the worker group restarts from a checkpoint (or a run is resumed), rank 0 calls
  ``restore(state, step)`` with the mixer state saved in that checkpoint: the trajectory and
  ``metrics.jsonl`` are cut back to that step, so the run continues the same trajectory.
* The mixer never blocks the caller forever: workers wait on it with a timeout (``round_timeout_s``).

It is also the one writer of the run's records (``balance/records.py``): the ``metrics.jsonl`` rows rank 0
sends (``log``), and ``mixture.json`` and ``result.json`` when the run finishes (``finish``).
The class is plain Python; ``create_mixer`` wraps it as an actor, and in-process training (no Ray Train)
uses it directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rnb_ray import atomic
from rnb_ray.balance import strategies
from rnb_ray.balance.gram import apply_floor
from rnb_ray.balance.records import RunRecords
from rnb_ray.balance.strategies import RoundStats, Strategy
from rnb_ray.balance.tracking import Tracking
from rnb_ray.errors import RnbError


@dataclass(frozen=True)
class MixerSpec:
    run_dir: str
    domains: list[str]
    strategy: str
    options: dict[str, Any]
    sizes: list[int]
    q: list[float]
    floor: float
    num_workers: int
    lam: float
    debug_dump_rounds: int = 0
    track: tuple[str, ...] = ()  # trackers of every metrics row (tracking.py): tensorboard, mlflow
    tracking_dir: str | None = None


def build_strategy(spec: MixerSpec) -> Strategy:
    """Construct the run's strategy; an unknown name or bad options become an RnbError."""
    return strategies.build(spec.strategy, len(spec.domains), sizes=spec.sizes, q=spec.q, options=spec.options)


def _tensors(obj: Any) -> Any:
    """numpy arrays → torch tensors, so state saves with torch.save and loads with weights_only=True."""
    import torch  # heavy import, only when state is saved

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_tensors(v) for v in obj)
    return obj


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Mixer state on disk, written atomically: torch.save of plain containers and tensors (never an
    arbitrary pickle)."""
    import torch  # heavy import, only when state is saved

    with atomic.atomic_file(path) as tmp:
        torch.save(_tensors(state), tmp)


def load_state(path: Path) -> dict[str, Any]:
    """Inverse of save_state; ``weights_only=True`` so a checkpoint cannot run code when loaded."""
    import torch  # heavy import, only when state is loaded

    return torch.load(path, map_location="cpu", weights_only=True)


def open_tracking(spec: MixerSpec) -> Tracking | None:
    """The run's trackers (None without ``track``); parameters: the mixer's settings."""
    if not spec.track or spec.tracking_dir is None:
        return None
    params = {"strategy": spec.strategy, "lam": spec.lam, "floor": spec.floor, "workers": spec.num_workers,
              "domains": len(spec.domains), **{f"option.{k}": v for k, v in spec.options.items()}}
    return Tracking(tuple(spec.track), Path(spec.tracking_dir), spec.domains, Path(spec.run_dir).name, params)


class Mixer:
    """See the module docstring. All public methods are actor methods."""

    def __init__(self, spec: MixerSpec):
        self.spec = spec
        self.dir = Path(spec.run_dir) / "mixer"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.pt"
        self.records = RunRecords(spec.run_dir, open_tracking(spec))
        self.m = len(spec.domains)
        self._pending: dict[int, dict[int, dict[str, Any]]] = {}
        self._events: dict[int, asyncio.Event] = {}
        self._advanced: asyncio.Event | None = None  # set (and replaced) whenever a round completes
        self.summary: dict[str, Any] | None = None
        self._fresh()
        self.restarted = False
        if self.state_path.is_file():  # a restart after a crash: continue where the last round left off
            self._load(load_state(self.state_path))
            self.restarted = True

    # ------------------------------------------------------------------ state
    def _fresh(self) -> None:
        self.strategy = build_strategy(self.spec)
        self.p = apply_floor(self.strategy.initial(), self.spec.floor)
        self.round = 0  # the next round to complete
        self.trajectory: list[dict[str, Any]] = [{"round": -1, "step": 0, "mixture": self.p.tolist(), "skipped": None}]
        self.last_gram: np.ndarray | None = None  # an array (saved as a tensor): m × m floats as lists are slow
        self.seconds = 0.0  # time spent aggregating and updating
        self.flops = 0

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p.tolist(), "round": self.round, "trajectory": self.trajectory,
                "last_gram": self.last_gram, "strategy": self.strategy.state_dict(),
                "seconds": self.seconds, "flops": self.flops, "spec": asdict(self.spec)}

    def _load(self, state: dict[str, Any]) -> None:
        self.strategy = build_strategy(self.spec)
        self.strategy.load_state_dict(state["strategy"])
        self.p = np.asarray(state["p"], dtype=np.float64)
        self.round = int(state["round"])
        self.trajectory = list(state["trajectory"])
        lg = state.get("last_gram")
        self.last_gram = None if lg is None else np.asarray(lg, dtype=np.float64)
        self.seconds = float(state.get("seconds", 0.0))
        self.flops = int(state.get("flops", 0))

    def _persist(self) -> None:
        save_state(self.state_path, self.state_dict())

    def restore(self, state: dict[str, Any] | None, step: int) -> dict[str, Any]:
        """(Re)start the run at ``step`` from a checkpoint's mixer state (None: from scratch)."""
        self._pending.clear()
        for ev in self._events.values():
            ev.set()
        self._events.clear()
        self._wake_later_rounds()
        if state is None:
            self._fresh()
        else:
            self._load(state)
        self.records.cut_back(step if state is not None else None)
        self._persist()
        return self.current()

    def current(self) -> dict[str, Any]:
        return {"round": self.round, "mixture": self.p.tolist(), "restarted": self.restarted}

    def result(self, round_: int) -> dict[str, Any]:
        """The outcome of a completed round (its entry in the trajectory)."""
        for entry in reversed(self.trajectory):
            if entry["round"] == round_:
                return {**entry, "seconds": self.seconds, "flops": self.flops}
        raise RnbError(f"mixing round {round_} is not recorded", where=str(self.state_path))

    def pending(self) -> dict[int, list[int]]:
        """Which ranks have contributed to each incomplete round (for timeout messages)."""
        return {r: sorted(c) for r, c in self._pending.items()}

    # ------------------------------------------------------------------ rounds
    async def submit(self, rank: int, round_: int, step: int, payload: dict[str, Any]) -> dict[str, Any]:
        if round_ < self.round:
            return self.result(round_)  # a retried call after a restart: already done
        while round_ > self.round:
            # Ray orders the calls of one caller, not of different workers: with ``stale`` a worker's next
            # round can arrive before another worker's current one. Wait for the current one to complete
            # (the worker's round timeout bounds the wait if it never does).
            if self._advanced is None:
                self._advanced = asyncio.Event()
            await self._advanced.wait()
        if round_ < self.round:  # completed (or restored past) while we waited
            return self.result(round_)
        contributions = self._pending.setdefault(round_, {})
        contributions[rank] = payload
        event = self._events.setdefault(round_, asyncio.Event())
        if len(contributions) == self.spec.num_workers:
            self._complete(round_, step)
            event.set()
        else:
            await event.wait()
        return self.result(round_)

    def _complete(self, round_: int, step: int) -> None:
        t0 = time.perf_counter()
        parts = [self._pending[round_][r] for r in sorted(self._pending[round_])]
        # The workers reduced the gradients among themselves: rank 0's part holds the global counts and
        # terms (the other ranks send only their shares of the evaluation losses, which add up).
        first = self._pending[round_][min(self._pending[round_])]
        counts = np.asarray(first["counts"]).astype(np.int64)
        eval_losses = None
        if first.get("eval_loss_sums") is not None:
            s = np.sum([pt["eval_loss_sums"] for pt in parts], axis=0)
            c = np.sum([pt["eval_loss_counts"] for pt in parts], axis=0)
            eval_losses = np.where(c > 0, s / np.maximum(c, 1), np.nan)
        gram = first.get("gram")
        if gram is not None:
            self.flops += 2 * self.m * self.m  # G q and its norm
        stats = RoundStats(round=round_, counts=counts, gram=None if gram is None else np.asarray(gram),
                           present=first.get("present"), eval_align=first.get("eval_align"),
                           eval_sq=first.get("eval_sq"), eval_losses=eval_losses, extra={"step": step})
        dump = round_ < self.spec.debug_dump_rounds
        try:
            new_p, reason = self.strategy.update(self.p.copy(), stats)
        except FloatingPointError as e:  # a strategy may raise on degenerate numbers: skip, do not crash
            new_p, reason = self.p, f"strategy error: {e}"
        new_p = np.asarray(new_p, dtype=np.float64)
        if reason is None and (new_p.shape != (self.m,) or not np.all(np.isfinite(new_p)) or np.any(new_p < 0)):
            new_p, reason = self.p, "strategy returned an invalid mixture"
        if reason is None:
            self.p = apply_floor(new_p, self.spec.floor)
        gram = getattr(self.strategy, "last_gram", None)
        self.last_gram = None if gram is None else np.asarray(gram, dtype=np.float64)
        entry = {"round": round_, "step": step, "mixture": self.p.tolist(), "skipped": reason, "counts": counts.tolist()}
        if first.get("sketch_error") is not None:
            entry["sketch_gram_rel_error"] = float(first["sketch_error"])
        self.trajectory.append(entry)
        if dump:
            np.savez(self.dir / f"round_{round_:04d}.npz", counts=counts,
                     gram=np.zeros((0,)) if gram is None else np.asarray(gram), mixture=self.p)
        self.round = round_ + 1
        del self._pending[round_]
        self._events.pop(round_, None)
        self._wake_later_rounds()
        self.seconds += time.perf_counter() - t0
        self._persist()

    def _wake_later_rounds(self) -> None:
        if self._advanced is not None:
            self._advanced.set()
            self._advanced = None

    # ------------------------------------------------------------------ recording
    def log(self, row: dict[str, Any]) -> None:
        """Append one ``metrics.jsonl`` row (sent by rank 0)."""
        self.records.append_metrics(row)

    def latest(self) -> dict[str, Any] | None:
        """The latest ``metrics.jsonl`` row (the driver's progress line polls it)."""
        return self.records.last_row

    def set_summary(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write ``mixture.json`` and ``result.json``; return the result summary."""
        spec = self.spec
        final = self.records.write_mixture(
            strategy=spec.strategy, domains=spec.domains, p=self.p.tolist(), q=spec.q, lam=spec.lam,
            floor=spec.floor, options=spec.options, trajectory=self.trajectory,
            last_gram=None if self.last_gram is None else self.last_gram.tolist())
        summary = dict(self.summary or {})
        summary.update(extra)
        summary.update({"rounds": self.round, "skipped_rounds": sum(1 for t in self.trajectory if t.get("skipped")),
                        "mixer_seconds": self.seconds, "mixer_flops": self.flops, "final_mixture": final})
        self.records.write_result(summary)
        return summary

    def ping(self) -> bool:
        return True


def create_mixer(spec: MixerSpec, name: str, *, max_restarts: int = 5) -> Any:
    """The run's named mixer actor, pinned to this node (it writes into the run directory), 0 CPUs."""
    import ray  # heavy import, only on the driver that creates the actor
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(Mixer)
    node = ray.get_runtime_context().get_node_id()
    handle = actor_cls.options(
        name=name, num_cpus=0, max_restarts=max_restarts, max_task_retries=-1, max_concurrency=1000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(spec)
    (Path(spec.run_dir) / "mixer").mkdir(parents=True, exist_ok=True)
    (Path(spec.run_dir) / "mixer" / "actor.json").write_text(json.dumps({"name": name}) + "\n", encoding="utf-8")
    return handle
