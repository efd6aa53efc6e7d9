"""R&B in your own training loop: the public API (stable names; everything else in the package may change).

Three pieces, each usable alone, composed the way ``rnb train`` composes them:

* ``GradientCapture`` — per-domain gradient sums of chosen layers of any ``nn.Module``, formed inside the
  ordinary backward (one GEMM per domain replaces autograd's one weight-gradient GEMM; ``param.grad`` is
  unchanged). Wrap a forward/backward in ``with capture.batch(domains):`` and call ``take()`` at the end of a
  round.
* ``DomainMixer`` — the mixer client: a round's sums and counts in, the next mixture p out. The client turns
  the sums into the few numbers the mixer needs (counts, which domains are present, the Gram matrix of the
  domain-mean gradients, evaluation terms): in one process directly, and under ``torch.distributed`` with
  the workers' collectives (the sums never leave the workers; rank 0 sends the terms). In process
  (``DomainMixer.local``) or the run's named Ray actor (``DomainMixer.start`` on the driver,
  ``DomainMixer.join`` in each worker). It records the trajectory of p in ``RUN/mixture.json``.
* ``domain_sampler`` — the checkpointable domain sampler over any per-domain indexable datasets (lists,
  ``torch`` map-style datasets, ``datasets.Dataset``): each example's domain is drawn from p, then the next
  example of that domain; ``state_dict``/``load_state_dict`` resume the exact same draws.

A complete round, in one process (R&B moves p towards domains whose gradients align with the others'):

>>> import tempfile, torch
>>> from rnb_ray.api import DomainMixer, GradientCapture, domain_sampler
>>> _ = torch.manual_seed(0)
>>> data = [[(torch.randn(4) + d, d) for _ in range(50)] for d in range(3)]  # domain d: class d
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
>>> capture = GradientCapture(model, num_domains=3, layers="head")
>>> mixer = DomainMixer.local(tempfile.mkdtemp(), domains=["a", "b", "c"], lam=3.0)
>>> sampler = domain_sampler(data, seed=0)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> p = mixer.mixture
>>> for step in range(1, 11):
...     examples, domains = sampler.next_batch(p, 8)
...     x, y = torch.stack([e[0] for e in examples]), torch.tensor([e[1] for e in examples])
...     with capture.batch(domains):
...         torch.nn.functional.cross_entropy(model(x), y).backward()
...     opt.step(); opt.zero_grad()
...     if step % 5 == 0:  # a round: sums and counts to the mixer, the next p back
...         sums, counts = capture.take()
...         p = mixer.send_round(sums, counts, step=step)
>>> mixer.round, bool(abs(p - 1 / 3).max() > 0.01), round(float(p.sum()), 6)
(2, True, 1.0)
>>> mixer.finish()["rounds"]  # writes RUN/mixture.json (the trajectory of p) and RUN/result.json
2

The Hugging Face ``Trainer`` integration is ``rnb_ray.integrations.hf``; a Ray Train ``train_func`` using this
API is ``examples/ray_train_rnb.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnb_ray.balance.capture import DomainGradCapture, find_capture_modules
from rnb_ray.balance.lm import grad_token_mask
from rnb_ray.balance.mixer import Mixer, MixerSpec, build_strategy, create_mixer
from rnb_ray.balance.mixer import load_state as _load_state
from rnb_ray.balance.mixer import save_state as _save_state
from rnb_ray.balance.round_reduce import RoundReducer
from rnb_ray.balance.runtime import ActorMixer, LocalMixer, Workspace, reduce_scatter_cols
from rnb_ray.balance.sampler import DomainSampler, DomainStream
from rnb_ray.errors import RnbError

__all__ = ["DomainMixer", "DomainSampler", "GradientCapture", "causal_lm_mask", "domain_names", "domain_sampler",
           "load_state", "save_state"]


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Save a state (``DomainMixer.state_dict()``, a sampler's ``state_dict()``) into your checkpoint:
    written atomically, numpy arrays as tensors, so ``load_state`` reads it with ``weights_only=True``."""
    _save_state(Path(path), state)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by ``save_state`` (``torch.load(..., weights_only=True)``: it cannot run code)."""
    return _load_state(Path(path))


def causal_lm_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The (B, T) positions of a right-padded causal LM batch whose outputs receive gradient (those that
    predict a real next token): the ``token_mask`` to give ``GradientCapture.batch`` for such a model."""
    return grad_token_mask(attention_mask)


def domain_names(values: Sequence[Any]) -> list[str]:
    """The domains of a column's values, as the package names them everywhere: their string form, ordered
    numerically when all are integers, else lexicographically.

    >>> domain_names([3, 1, 10, 1])
    ['1', '3', '10']
    >>> domain_names(["web", "code", "web"])
    ['code', 'web']
    """
    names = {str(v) for v in values}
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


# ============================================================================ capture
class GradientCapture:
    """Per-domain gradient sums of chosen linear layers of any ``nn.Module``, from the ordinary backward.

    ``layers``: ``"head"`` (the output embedding of a Hugging Face model, else the last linear layer),
    ``"last_block"`` (the linear layers of the last block of the longest ``nn.ModuleList``),
    ``"head+last_block"``, or comma-separated module names (``nn.Linear`` or GPT-2's ``Conv1D``).
    ``sketch_dim > 0`` keeps a sketch of each layer's per-domain gradient instead of the exact sum (for large
    heads; see ``balance/sketch.py``): ``sketch_kind="rowhash"`` hashes the layer's rows into ``sketch_dim``
    buckets (``sketch_dim``·in numbers), ``"gaussian"`` projects both sides (``sketch_dim`` numbers).
    ``exact_rows`` (row hash): ``{layer name: row ids}`` kept exact in buckets of their own — for an LM head,
    the most frequent tokens (``rnb_ray.balance.sketch.frequent_rows(token_counts, k)``), which carry most of
    its gradient; every worker must pass the same rows. Create it *before* wrapping the model in DDP.

    Per step: ``with capture.batch(domains, token_mask):`` around the forward and backward of a batch whose
    examples belong to ``domains`` (B,). Per round: ``take()`` → (sums (m, D) float32, counts (m,)) and reset.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> capture = GradientCapture(model, num_domains=2, layers="head")
    >>> capture.layer_names, capture.dim
    (['2'], 24)
    >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> with capture.batch(torch.tensor([0, 1, 0, 1, 1, 1])):
    ...     torch.nn.functional.cross_entropy(model(x), y).backward()  # a mean over the 6 examples
    >>> sums, counts = capture.take()
    >>> sums.shape, counts.tolist()
    ((2, 24), [2, 4])
    >>> # the sums are sums of per-example gradients; together they are the ordinary gradient (x B)
    >>> torch.allclose(torch.from_numpy(sums.sum(0)).view(3, 8) / 6, model[2].weight.grad, atol=1e-6)
    True
    >>> capture.remove()  # the layers get their own forward back
    """

    def __init__(self, model: nn.Module, num_domains: int, layers: str = "head", *, sketch_dim: int = 0,
                 sketch_kind: str = "rowhash", exact_rows: dict[str, Any] | None = None, seed: int = 0,
                 device: torch.device | str | None = None):
        if num_domains < 1:
            raise RnbError(f"num_domains is {num_domains}", where="GradientCapture", fix="give at least 1 domain")
        try:
            modules = find_capture_modules(model, layers)
        except ValueError as e:
            raise RnbError(f"bad layers {layers!r}: {e}", where="GradientCapture(layers=...)",
                           fix="use head, last_block, head+last_block or linear module names") from e
        if device is None:
            device = next(iter(modules.values())).weight.device
        try:
            self._capture = DomainGradCapture(
                modules, num_domains, sketch_dim=sketch_dim, seed=seed, device=device, sketch_kind=sketch_kind,
                exact_rows={k: torch.as_tensor(v) for k, v in (exact_rows or {}).items()})
        except ValueError as e:
            fix = ("use sketch_kind='rowhash' or 'gaussian'" if "sketch kind" in str(e) else
                   "give fewer exact rows than sketch_dim buckets, within the layer" if "exact rows" in str(e) else
                   "capture each layer once")
            raise RnbError(str(e), where="GradientCapture", fix=fix) from e

    @property
    def num_domains(self) -> int:
        return self._capture.num_domains

    @property
    def layer_names(self) -> list[str]:
        """The captured modules, in the order their parts are concatenated in a row of the sums."""
        return self._capture.names

    @property
    def dim(self) -> int:
        """Numbers per domain in the sums (the captured weights' sizes, or the sketches')."""
        return self._capture.dim

    @property
    def counts(self) -> np.ndarray:
        """Examples captured per domain since the last ``take()``."""
        return self._capture.counts.numpy().copy()

    @property
    def flops(self) -> int:
        """Floating-point operations capture added to the backward so far."""
        return int(self._capture.flops)

    def begin(self, domains: Any, token_mask: torch.Tensor | None = None, *, scale: float | None = None) -> None:
        """Announce the next forward's examples (``batch`` without the context manager; see there)."""
        doms = torch.as_tensor(np.asarray(domains) if not torch.is_tensor(domains) else domains).reshape(-1)
        if token_mask is None:
            token_mask = torch.ones(doms.numel(), 1, dtype=torch.bool)
        try:
            self._capture.begin(doms, token_mask, float(doms.numel() if scale is None else scale))
        except ValueError as e:
            raise RnbError(str(e), where="GradientCapture.batch",
                           fix="give one domain id in [0, num_domains) per example and a (B, T) token_mask") from e

    def end(self) -> None:
        """Stop capturing (forwards run as usual until the next ``begin``)."""
        self._capture.end()

    @contextlib.contextmanager
    def batch(self, domains: Any, token_mask: torch.Tensor | None = None, *,
              scale: float | None = None) -> Iterator[None]:
        """Capture the forward and backward run inside the block.

        ``domains``: each example's domain id (B,). ``token_mask``: (B, T) for a sequence model — every
        captured layer must see all B·T rows; the positions whose outputs carry gradient matter only for
        sketches (``causal_lm_mask(attention_mask)`` for a causal LM); None for a model with one row per
        example. ``scale``: the factor that turns the loss's gradient into a sum over examples — B (the
        default) for a loss that is a mean over the batch's examples, 1 for a sum. Examples ordered by domain
        are grouped without a copy."""
        self.begin(domains, token_mask, scale=scale)
        try:
            yield
        finally:
            self.end()

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-domain gradient sums (m, D) float32, example counts (m,) int64) since the last take; resets."""
        return self._capture.take()

    def remove(self) -> None:
        """Give the captured layers their own forward back (idempotent)."""
        self._capture.remove()


# ============================================================================ mixer
def mixer_spec(run_dir: str | Path, domains: Sequence[str], *, strategy: str = "rnb", lam: float = 3.0,
               q: Sequence[float] | None = None, sizes: Sequence[int] | None = None, floor: float = 0.0,
               options: dict[str, Any] | None = None, num_workers: int = 1) -> MixerSpec:
    """The mixer's settings: q (the evaluation proportions R&B weighs G by) defaults to uniform, sizes (used by
    ``natural``) to ones; λ goes into the rnb strategy's options, as ``rnb train`` does."""
    domains = [str(d) for d in domains]
    m = len(domains)
    if m < 1 or len(set(domains)) != m:
        raise RnbError(f"domains must be distinct names, got {domains}", where="DomainMixer(domains=...)",
                       fix="give one name per domain")
    q_arr = np.full(m, 1.0 / m) if q is None else np.asarray(q, dtype=np.float64)
    if q_arr.shape != (m,) or np.any(q_arr < 0) or not q_arr.sum() > 0:
        raise RnbError(f"q must be {m} non-negative numbers, got {q}", where="DomainMixer(q=...)",
                       fix="one evaluation proportion per domain")
    sizes_l = [1] * m if sizes is None else [int(s) for s in sizes]
    if len(sizes_l) != m:
        raise RnbError(f"sizes has {len(sizes_l)} entries for {m} domains", where="DomainMixer(sizes=...)",
                       fix="one size per domain")
    if not 0.0 <= floor < 1.0 / m:
        raise RnbError(f"floor {floor} is outside [0, 1/m)", where="DomainMixer(floor=...)",
                       fix=f"use 0 <= floor < {1 / m:.4g}")
    opts = dict(options or {})
    if strategy == "rnb":
        opts["lam"] = float(lam)
    spec = MixerSpec(run_dir=str(run_dir), domains=domains, strategy=strategy, options=opts, sizes=sizes_l,
                     q=(q_arr / q_arr.sum()).tolist(), floor=float(floor), num_workers=int(num_workers),
                     lam=float(lam))
    build_strategy(spec)  # an unknown strategy or bad options fail here, before anything is written
    return spec


def _check_fresh(run_dir: str | Path, resume: bool) -> None:
    state = Path(run_dir) / "mixer" / "state.pt"
    if state.exists() and not resume:
        raise RnbError(f"{run_dir} already holds a mixer's state ({state})", where="DomainMixer(run_dir=...)",
                       fix="choose a new run directory, or pass resume=True to continue that run")


class _Collectives:
    """The part of the trainer's ``Runtime`` that ``RoundReducer`` uses, over ``torch.distributed`` when it is
    initialised with more than one process (the user's own process group, e.g. Ray Train's), else no-ops."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
        nccl = multi and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self._dist.all_reduce(t)
        return t

    def reduce_scatter_cols(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> torch.Tensor:
        return reduce_scatter_cols(x, self.world, rows, workspace)

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out


class DomainMixer:
    """The mixer client: send a round's per-domain sums and counts, get the next mixture p.

    Construct it with ``DomainMixer.local`` (in process, no Ray), ``DomainMixer.start`` (the driver starts
    the run's named Ray actor, or joins it if it runs) or ``DomainMixer.join`` (a worker joins it by name).
    Every worker of a round calls ``send_round`` with its own sums and counts; the round completes when the
    ``num_workers``-th arrives, and every caller gets the same p. The sums stay with the client: it keeps each
    domain's latest mean gradient (a domain absent from a round keeps its last one) and sends the mixer the
    counts, the domains present and their Gram matrix (with ``torch.distributed`` initialised over several
    processes, reduced among them with the trainer's own collectives; rank 0 sends these terms, every rank its
    evaluation-loss shares). The mixer writes
    ``RUN/mixer/state.pt`` after every round, ``RUN/metrics.jsonl`` rows sent with ``log`` and, on
    ``finish()``, ``RUN/mixture.json`` (the trajectory of p) and ``RUN/result.json``.

    >>> import tempfile, numpy as np
    >>> mixer = DomainMixer.local(tempfile.mkdtemp(), domains=["code", "web"], lam=3.0)
    >>> mixer.mixture.tolist()
    [0.5, 0.5]
    >>> sums = np.array([[1.0, 0.0], [1.0, 1.0]], dtype=np.float32)  # per-domain gradient sums (m, D)
    >>> p = mixer.send_round(sums, counts=np.array([1, 1]), step=10)
    >>> bool(p[1] > p[0]), mixer.round  # web's gradient aligns more with the others': it gets more weight
    (True, 1)
    """

    def __init__(self, client: Any, *, rank: int = 0, owned_actor: Any = None, domains: Sequence[str] | None = None):
        self._client = client  # runtime.LocalMixer or runtime.ActorMixer (the seam the trainer uses too)
        self.rank = int(rank)
        self._owned = owned_actor
        current = self._client.call("current")
        self._round = int(current["round"])
        self._p = np.asarray(current["mixture"], dtype=np.float64)
        if domains is None:  # a worker joining by name: ask the mixer once
            domains = self._client.call("state_dict")["spec"]["domains"]
        self._domains: list[str] = [str(d) for d in domains]
        self.last_skipped: str | None = None  # why the last round's update was skipped (None: applied)
        self._reducer: RoundReducer | None = None  # this client's domain estimates (made at the first round)
        self._estimates: dict[str, Any] | None = None  # restored estimates, loaded into the reducer when made

    # ---------------------------------------------------------------- construction
    @classmethod
    def local(cls, run_dir: str | Path, domains: Sequence[str], *, strategy: str = "rnb", lam: float = 3.0,
              q: Sequence[float] | None = None, sizes: Sequence[int] | None = None, floor: float = 0.0,
              options: dict[str, Any] | None = None, resume: bool = False) -> DomainMixer:
        """The mixer as a plain object in this process (one worker): no Ray needed."""
        spec = mixer_spec(run_dir, domains, strategy=strategy, lam=lam, q=q, sizes=sizes, floor=floor,
                          options=options, num_workers=1)
        _check_fresh(run_dir, resume)
        return cls(LocalMixer(Mixer(spec)), domains=spec.domains)

    @classmethod
    def start(cls, name: str, run_dir: str | Path, domains: Sequence[str], *, num_workers: int,
              strategy: str = "rnb", lam: float = 3.0, q: Sequence[float] | None = None,
              sizes: Sequence[int] | None = None, floor: float = 0.0, options: dict[str, Any] | None = None,
              resume: bool = False, timeout_s: float = 600.0) -> DomainMixer:
        """Start the run's named mixer actor (on this node: it writes into ``run_dir``), or join it when an
        actor of that name already runs. Call on the driver, with Ray initialised; ``close()`` ends it."""
        import ray

        if not ray.is_initialized():
            raise RnbError("Ray is not initialised", where="DomainMixer.start",
                           fix="call ray.init() first, or use DomainMixer.local without Ray")
        with contextlib.suppress(ValueError):
            ray.get_actor(name)
            return cls.join(name, timeout_s=timeout_s)
        spec = mixer_spec(run_dir, domains, strategy=strategy, lam=lam, q=q, sizes=sizes, floor=floor,
                          options=options, num_workers=num_workers)
        _check_fresh(run_dir, resume)
        handle = create_mixer(spec, name)
        ray.get(handle.ping.remote(), timeout=timeout_s)
        return cls(ActorMixer(name, timeout_s), owned_actor=handle, domains=spec.domains)

    @classmethod
    def join(cls, name: str, *, rank: int = 0, timeout_s: float = 600.0) -> DomainMixer:
        """Join a running mixer actor by name, as worker ``rank`` (e.g. inside a Ray Train ``train_func``).
        Every wait on it times out after ``timeout_s`` with an error naming the rounds still incomplete."""
        try:
            client = ActorMixer(name, timeout_s)
        except ValueError as e:
            raise RnbError(f"no mixer actor named {name!r} runs in this Ray cluster", where="DomainMixer.join",
                           fix="start it on the driver with DomainMixer.start(name, ...) first") from e
        return cls(client, rank=rank)

    # ---------------------------------------------------------------- rounds
    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    @property
    def mixture(self) -> np.ndarray:
        """The mixture p in use (as of this client's last round)."""
        return self._p.copy()

    @property
    def round(self) -> int:
        """The next round this client sends (rounds completed so far)."""
        return self._round

    def send_round(self, sums: np.ndarray | None, counts: np.ndarray, *, step: int, **extra: Any) -> np.ndarray:
        """This worker's share of a round: per-domain gradient sums (m, D) and example counts (m,) since the
        last round (``GradientCapture.take()``), plus whatever else the strategy needs (``eval_grad`` — the
        evaluation examples' summed gradient (D,) — and ``eval_count``, ``eval_loss_sums`` and
        ``eval_loss_counts``). The sums and evaluation gradient are reduced here into counts, present domains,
        Gram matrix and evaluation terms (across the ``torch.distributed`` workers when there are several:
        every worker must call this at the same round). Waits for every worker's share; returns the next p
        (unchanged when the strategy skipped the round: ``last_skipped`` says why)."""
        m = len(self._domains)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (m,):
            raise RnbError(f"counts has shape {counts.shape} for {m} domains",
                           where="DomainMixer.send_round", fix="send the (m,) counts from GradientCapture.take()")
        if sums is not None and (np.ndim(sums) != 2 or np.shape(sums)[0] != m):
            raise RnbError(f"sums has shape {np.shape(sums)} for {m} domains", where="DomainMixer.send_round",
                           fix="send the (m, D) sums from GradientCapture.take()")
        eval_grad = extra.pop("eval_grad", None)
        eval_count = int(extra.pop("eval_count", 0) or 0)
        payload: dict[str, Any] = {**extra, **self._terms(sums, counts, eval_grad, eval_count)}
        answer = self._client.submit(self.rank, self._round, int(step), payload).result()
        self._round += 1
        self._p = np.asarray(answer["mixture"], dtype=np.float64)
        self.last_skipped = answer.get("skipped")
        return self.mixture

    def _terms(self, sums: np.ndarray | None, counts: np.ndarray, eval_grad: np.ndarray | None,
               eval_count: int) -> dict[str, Any]:
        """What the mixer reads of a round: counts, present, G (and eval_align, eval_sq, eval_count), from
        ``RoundReducer`` — in one process its collectives are no-ops and it is ``gram_terms.DomainEstimates``
        on the whole vectors; with several workers the same reduction ``rnb train``'s workers run."""
        dim = int(np.shape(sums)[1]) if sums is not None else int(np.size(eval_grad)) if eval_grad is not None else 0
        if self._reducer is None or (dim and self._reducer.dim != dim):
            self._reducer = RoundReducer(_Collectives(), len(self._domains), dim)  # type: ignore[arg-type]
            if self._estimates is not None:
                self._reducer.estimates.load_state_dict(self._estimates)
                self._estimates = None
        red = self._reducer
        dev = red.rt.device
        t_sums = torch.as_tensor(np.asarray(sums, dtype=np.float32)).to(dev) if sums is not None else None
        t_eval = (torch.as_tensor(np.asarray(eval_grad, dtype=np.float32)).reshape(-1).to(dev)
                  if eval_grad is not None else None)
        terms = red.reduce(t_sums, torch.as_tensor(counts), t_eval, eval_count)
        if red.rt.rank != 0:  # every worker holds the same terms; the mixer reads rank 0's
            return {"counts": terms["counts"]}
        return terms

    # ---------------------------------------------------------------- records and state
    def log(self, row: dict[str, Any]) -> None:
        """Append one row to ``RUN/metrics.jsonl`` (not waited for)."""
        self._client.log(row)

    def trajectory(self) -> list[dict[str, Any]]:
        """Every round so far: ``{"round", "step", "mixture", "skipped", ...}`` (round -1: the initial p)."""
        return list(self._client.call("state_dict")["trajectory"])

    def state_dict(self) -> dict[str, Any]:
        """The mixer's state, to keep in your checkpoint (p, the round, the trajectory, the strategy's state),
        with this client's domain-gradient estimates under ``"client_estimates"`` (with several workers, this
        worker's columns of them: keep every rank's)."""
        state = dict(self._client.call("state_dict"))
        if self._reducer is not None:
            state["client_estimates"] = self._reducer.estimates.state_dict()
        return state

    def restore(self, state: dict[str, Any] | None, step: int) -> None:
        """Continue from a checkpoint taken at ``step`` (call once, on one worker, before the next round):
        the trajectory and ``metrics.jsonl`` are cut back to it. ``None`` starts the mixer afresh. This
        client's domain-gradient estimates come back from the state too (other workers: ``sync(state)``)."""
        state = None if state is None else dict(state)
        self._load_estimates(None if state is None else state.pop("client_estimates", None))
        current = self._client.call("restore", state, int(step))
        self._round, self._p = int(current["round"]), np.asarray(current["mixture"], dtype=np.float64)

    def sync(self, state: dict[str, Any] | None = None) -> np.ndarray:
        """Read the mixer's current round and p again (a worker after another one called ``restore``);
        ``state``: this worker's own ``state_dict()`` from the checkpoint, for its domain-gradient estimates."""
        if state is not None:
            self._load_estimates(state.get("client_estimates"))
        current = self._client.call("current")
        self._round, self._p = int(current["round"]), np.asarray(current["mixture"], dtype=np.float64)
        return self.mixture

    def _load_estimates(self, est: dict[str, Any] | None) -> None:
        self._reducer, self._estimates = None, est  # loaded when the next round makes the reducer

    def finish(self, **summary: Any) -> dict[str, Any]:
        """Write ``RUN/mixture.json`` (final p, trajectory, last Gram matrix) and ``RUN/result.json``
        (``summary`` plus the mixer's totals); returns the mixer's part of the summary."""
        out = self._client.call("finish", summary)
        return {k: v for k, v in out.items() if k not in summary}

    def close(self) -> None:
        """End the mixer actor if this client started it (records already written stay)."""
        if self._owned is not None:
            import ray

            ray.kill(self._owned)
            self._owned = None


# ============================================================================ sampler
def domain_sampler(datasets: Sequence[Any], *, seed: int = 0, rank: int = 0, world: int = 1,
                   chunk_size: int = 1024) -> DomainSampler:
    """The checkpointable domain sampler over per-domain indexable datasets (``len`` and ``[i]``).

    ``next_batch(p, n)`` → (n examples, their domain ids): each domain drawn from p, then that domain's next
    example. Worker ``rank`` of ``world`` owns rows ``rank, rank + world, ...`` of each domain; it reads them
    in chunks of ``chunk_size`` rows, chunks in a seeded order that changes every epoch, rows shuffled within
    a chunk; a domain that runs out starts a new epoch. ``state_dict()`` is a few integers per domain plus the
    draw RNG; ``load_state_dict`` replays the same examples.

    >>> sampler = domain_sampler([["a0", "a1", "a2"], ["b0", "b1"]], seed=0)
    >>> state = sampler.state_dict()
    >>> first = sampler.next_batch([0.5, 0.5], 6)
    >>> sampler.load_state_dict(state)
    >>> again = sampler.next_batch([0.5, 0.5], 6)
    >>> first[0] == again[0] and first[1].tolist() == again[1].tolist()
    True
    >>> sorted(set(first[0]))[:1], set(first[1].tolist()) <= {0, 1}
    (['a0'], True)
    """
    if not datasets:
        raise RnbError("no domains given", where="domain_sampler", fix="give one dataset per domain")
    if not 0 <= rank < world or chunk_size < 1:
        raise RnbError(f"rank {rank}, world {world}, chunk_size {chunk_size}", where="domain_sampler",
                       fix="0 <= rank < world and chunk_size >= 1")
    units: list[tuple[Any, np.ndarray]] = []  # unit key -> (dataset, this worker's rows of it)

    def load(key: int, start: int) -> list[tuple[range, list[Any]]]:
        ds, rows = units[key]
        return [(range(start, len(rows)), [ds[int(i)] for i in rows[start:]])]

    streams = []
    for d, ds in enumerate(datasets):
        n = len(ds)
        mine = np.arange(n) if n < world else np.arange(rank, n, world)
        keys = []
        for start in range(0, len(mine), chunk_size):
            units.append((ds, mine[start: start + chunk_size]))
            keys.append(len(units) - 1)
        if not keys:
            raise RnbError(f"domain {d} has no examples", where="domain_sampler",
                           fix="drop empty domains (or give them examples)")
        streams.append(DomainStream(keys, seed=seed * 7919 + rank * 131 + d, loader=load, buffer=chunk_size))
    return DomainSampler(streams, seed=seed * 1009 + rank)
