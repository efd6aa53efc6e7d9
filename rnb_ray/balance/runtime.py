"""Where a training worker runs: one small interface, two implementations.

The trainer (``balance/trainer.py``) does not know whether it runs inside a Ray Train worker or alone in
the calling process; it talks to a ``Runtime``:

* ``LocalRuntime`` — one process, no torch.distributed; the mixer is a plain ``Mixer`` object in the same
  process; checkpoints are copied to ``RUN/checkpoints/local/checkpoint_<step>`` (the two newest kept).
  For Ray Tune trainables (the sweep) and quick experiments.
* ``RayTrainRuntime`` — inside a ``TorchTrainer`` worker: DDP collectives, the run's named mixer actor,
  checkpoints through ``ray.train.report`` (Ray Train keeps them under ``RUN/checkpoints``).

Either way the mixer is reached through a ``MixerClient`` (``runtime.mixer``), whose ``submit`` returns a
``PendingRound``: the round's answer, waited for only when ``result()`` is called (with ``stale`` the
trainer reads it one round later).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from rnb_ray.atomic import atomic_dir
from rnb_ray.balance.mixer import Mixer
from rnb_ray.errors import RnbError


class PendingRound:
    """A mixing round handed to the mixer. ``result()`` waits for its outcome: ``{"round", "mixture",
    "skipped", "seconds", "flops", ...}`` (the round's trajectory entry plus the mixer's totals)."""

    def __init__(self, round_: int, wait: Callable[[], dict[str, Any]]):
        self.round = round_
        self._wait = wait

    def result(self) -> dict[str, Any]:
        return self._wait()


class MixerClient(Protocol):
    def call(self, method: str, *args: Any) -> Any:
        """Call a ``Mixer`` method and wait for its answer."""

    def submit(self, rank: int, round_: int, step: int, payload: dict[str, Any]) -> PendingRound:
        """This worker's contribution to a round."""

    def recorded(self, round_: int) -> PendingRound:
        """A round the mixer has completed; ``result()`` reads its record again."""

    def log(self, row: dict[str, Any]) -> None:
        """Append a ``metrics.jsonl`` row (not waited for)."""


class Runtime(Protocol):
    rank: int
    world: int
    device: torch.device
    mixer: MixerClient

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over workers (in place)."""

    def reduce_scatter_cols(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> torch.Tensor:
        """Sum (m, D) over workers — only ``rows`` of it when given, the same on every worker — and keep this
        rank's ⌈D/W⌉ columns (rank r: columns r·c …, zero-padded). One worker: ``x`` itself when ``rows`` is None."""

    def barrier(self) -> None: ...

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's ``obj``, in rank order."""

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """A backward whose gradients stay local (no DDP all-reduce)."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint directory to continue from, or None for a fresh start."""

    def save_checkpoint(self, src: Path | None, step: int) -> None:
        """Publish the checkpoint written to ``src`` (rank 0; None on the other ranks, which must call too)."""

    def report(self, row: dict[str, Any]) -> None:
        """A ``metrics.jsonl`` row, for whoever watches this process (e.g. Ray Tune)."""


class Workspace:
    """A buffer kept across rounds by its owner (a fresh tens-of-MB tensor page-faults on first touch: the round's
    collective of 29 rows × 786 k floats between 2 gloo processes took 159 ms from a fresh buffer, 132 ms from a
    kept one; ``benchmarks/results/balance_overhead_gpt2.json``, "collective_paths"). Grows, never shrinks."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        if self.buf is None or self.buf.numel() < n or self.buf.dtype != dtype or self.buf.device != device:
            self.buf = torch.empty(n, dtype=dtype, device=device)
        return self.buf[:n].view(shape)


def reduce_scatter_cols(x: torch.Tensor, world: int, rows: torch.Tensor | None = None,
                        workspace: Workspace | None = None, method: str | None = None) -> torch.Tensor:
    """Over the default process group: sum the (m, D) ``x`` — only its ``rows`` when given (as many on every rank:
    a round sends the domains some worker saw, not all m; a row -1 stands for zeros: a domain this rank did not
    see) — across ranks and keep this rank's ⌈D/W⌉ columns, zero-padded: (len(rows) or m, ⌈D/W⌉). ``x`` is not
    modified. A ``workspace`` holds the collective's buffer across calls; on CPU the result is a view into it,
    valid until the workspace's next use.

    On GPU (nccl) this is a reduce-scatter. On CPU (gloo) the chosen rows are gathered into one buffer, all-reduced
    in place, and each rank keeps a view of its columns: gloo's reduce-scatter plus the per-rank gather it needs
    took 284 ms for 29 rows × 786 k floats between 2 processes here, the row gather and all-reduce 132 ms
    (``benchmarks/results/balance_overhead_gpt2.json``, "collective_paths"). ``method`` ("all_reduce" or
    "reduce_scatter") overrides the choice by device (for that comparison and the tests)."""
    if world == 1 and (rows is None or bool((rows >= 0).all())):
        return x if rows is None else x.index_select(0, rows.to(x.device))
    m, D = x.shape
    idx = torch.arange(m, device=x.device) if rows is None else rows.to(x.device)
    n, c = int(idx.numel()), -(-D // world)
    if world == 1:
        return _gather_rows(x, idx, torch.empty(n, D, dtype=x.dtype, device=x.device))
    ws = workspace or Workspace()
    method = method or ("all_reduce" if x.device.type == "cpu" else "reduce_scatter")
    if method not in ("all_reduce", "reduce_scatter"):
        raise ValueError(f"unknown method {method!r}: all_reduce or reduce_scatter")
    full = bool((idx >= 0).all())
    if method == "all_reduce":
        buf = ws.take((n, c * world), x.dtype, x.device)
        if c * world == D and full:
            torch.index_select(x, 0, idx, out=buf)
        else:  # zero-padded to W·c columns, so every rank's view has c of them
            _gather_rows(x, idx, buf[:, :D])
            buf[:, D:] = 0
        if n:
            dist.all_reduce(buf)
        r = dist.get_rank()
        return buf[:, r * c:(r + 1) * c]
    # Each rank's columns of the chosen rows, contiguous and in rank order: one gather per rank straight from
    # ``x`` (no copy of all m rows, no padded copy, no transposed copy).
    send = ws.take((world, n, c), x.dtype, x.device)
    for w in range(world):
        a, b = min(w * c, D), min((w + 1) * c, D)
        if b - a == c and full:
            torch.index_select(x[:, a:b], 0, idx, out=send[w])
        else:  # the last rank's columns are fewer: zero-padded
            _gather_rows(x[:, a:b], idx, send[w, :, : b - a])
            send[w, :, b - a:] = 0
    out = torch.empty(n, c, dtype=x.dtype, device=x.device)
    if n:
        dist.reduce_scatter_tensor(out.view(-1), send.view(-1))
    return out


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = x[idx[i]], or zeros where idx[i] is -1 (row by row: no gathered temporary)."""
    for i, r in enumerate(idx.tolist()):
        if r < 0:
            out[i].zero_()
        else:
            out[i].copy_(x[r])
    return out


# ============================================================================ in the calling process
class LocalMixer:
    """The ``Mixer`` object itself: a round completes as soon as this (only) worker submits it."""

    def __init__(self, mixer: Mixer):
        self.mixer = mixer

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.mixer, method)(*args)

    def submit(self, rank: int, round_: int, step: int, payload: dict[str, Any]) -> PendingRound:
        answer = asyncio.run(self.mixer.submit(rank, round_, step, payload))
        return PendingRound(round_, lambda: answer)

    def recorded(self, round_: int) -> PendingRound:
        return PendingRound(round_, lambda: self.mixer.result(round_))

    def log(self, row: dict[str, Any]) -> None:
        self.mixer.log(row)


class LocalRuntime:
    """One process, no torch.distributed; checkpoints under RUN/checkpoints/local/."""

    rank, world = 0, 1

    def __init__(self, run_dir: Path, mixer: Mixer, *, use_gpu: bool = False,
                 report: Callable[[dict[str, Any]], None] | None = None):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.mixer = LocalMixer(mixer)
        self.ckpt_root = run_dir / "checkpoints" / "local"
        self.report_fn = report

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_scatter_cols(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> torch.Tensor:
        return reduce_scatter_cols(x, 1, rows, workspace)

    def barrier(self) -> None:
        pass

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        cks = sorted(self.ckpt_root.glob("checkpoint_*")) if self.ckpt_root.is_dir() else []
        yield cks[-1] if cks else None

    def save_checkpoint(self, src: Path | None, step: int) -> None:
        assert src is not None
        with atomic_dir(self.ckpt_root / f"checkpoint_{step:09d}") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        for old in sorted(self.ckpt_root.glob("checkpoint_*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    def report(self, row: dict[str, Any]) -> None:
        if self.report_fn is not None:
            self.report_fn(row)


# ============================================================================ inside a TorchTrainer worker
class ActorMixer:
    """The run's named mixer actor; every wait has a timeout that names what was waited for."""

    def __init__(self, name: str, timeout: float):
        import ray

        self.ray = ray
        self.name = name
        self.handle = ray.get_actor(name)
        self.timeout = timeout

    def call(self, method: str, *args: Any) -> Any:
        return self._get(getattr(self.handle, method).remote(*args), f"mixer.{method}")

    def submit(self, rank: int, round_: int, step: int, payload: dict[str, Any]) -> PendingRound:
        ref = self.handle.submit.remote(rank, round_, step, payload)
        return PendingRound(round_, lambda: self._get(ref, f"mixing round {round_}"))

    def recorded(self, round_: int) -> PendingRound:
        return PendingRound(round_, lambda: self.call("result", round_))

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


class RayTrainRuntime:
    """Inside a TorchTrainer worker: DDP (gloo on CPU, nccl on GPU), Ray Train checkpoints, the mixer actor."""

    def __init__(self, mixer_name: str, timeout: float):
        import ray.train
        import ray.train.torch

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.mixer = ActorMixer(mixer_name, timeout)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def reduce_scatter_cols(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> torch.Tensor:
        return reduce_scatter_cols(x, self.world, rows, workspace)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as d:
                yield Path(d)

    def save_checkpoint(self, src: Path | None, step: int) -> None:
        ckpt = self._train.Checkpoint.from_directory(str(src)) if src is not None else None
        self._train.report({"step": step}, checkpoint=ckpt)  # a barrier across workers

    def report(self, row: dict[str, Any]) -> None:
        pass  # rows go to metrics.jsonl through the mixer; Ray Train V2 does not keep metric-only reports
