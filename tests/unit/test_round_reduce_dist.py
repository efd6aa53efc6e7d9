"""``RoundReducer`` with 2 real gloo processes equals 1 process on the union of their sums (no Ray)."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rnb_ray.balance.round_reduce import RoundReducer
from rnb_ray.balance.runtime import Workspace, reduce_scatter_cols

M, D = 4, 11  # D not a multiple of 2: the last shard is zero-padded
# The columns holding sketched numbers (a row hash's hashed buckets come after its exact rows): on both
# workers' shards (columns 0-5 and 6-10), or only on the second's (the first then has none of its own).
SKETCHED = torch.arange(D) >= 4
ONLY_SECOND = torch.arange(D) >= 7
ROWS = torch.tensor([0, 2])


class _GlooRuntime:
    """The collectives of ``RayTrainRuntime`` (the same ``reduce_scatter_cols``), without Ray Train."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.device = rank, world, torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def reduce_scatter_cols(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> torch.Tensor:
        return reduce_scatter_cols(x, self.world, rows, workspace)

    def gather(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _inputs(rank: int, rnd: int):
    g = torch.Generator().manual_seed(100 * rnd + rank)
    counts = torch.randint(0, 3, (M,), generator=g)
    counts[rnd % M] = 0  # absent from round rnd on both workers: keeps its last estimate
    counts[(rnd + 1) % M] = 1 + rank  # present in every round on both workers
    if rnd == 2 and rank == 1:
        counts[(rnd + 2) % M] = 1
    sums = torch.randn(M, D, generator=g) * counts[:, None]
    if rnd == 2 and rank == 1:  # a NaN on the second worker's columns only: both workers must drop the domain
        sums[(rnd + 2) % M, D - 1] = float("nan")
    return sums, counts, torch.randn(D, generator=g), 2


def _slotted(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums as a slotted capture holds them: the domains seen here in rows 0, 1, … (in reverse domain
    order, so rows are not domain order), ``rows[d]`` = d's row or -1, and one spare row of garbage after them
    (rows past the round's are never read)."""
    seen = torch.nonzero(counts > 0).reshape(-1).flip(0)
    rows = torch.full((M,), -1, dtype=torch.long)
    rows[seen] = torch.arange(seen.numel())
    compact = torch.cat([sums[seen], torch.full((1, D), 1e6)])
    return compact, rows


def _run(reducer: RoundReducer, parts: list, slotted: bool = False) -> list[dict]:
    out = []
    for sums, counts, ev, n in parts:
        if slotted:
            compact, rows = _slotted(sums, counts)
            terms = reducer.reduce(compact, counts, ev, n, keep_means=True, rows=rows)
        else:
            terms = reducer.reduce(sums, counts, ev, n, keep_means=True)
        terms["means"] = reducer.full_means()
        pickle.loads(pickle.dumps(terms, protocol=5))  # what Ray does with the payload
        out.append(terms)
    return out


def _worker(rank: int, port: int, q, sketched) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        res = _run(RoundReducer(_GlooRuntime(rank, 2), M, D, sketched), [_inputs(rank, r) for r in range(3)])
        slotted = _run(RoundReducer(_GlooRuntime(rank, 2), M, D, sketched), [_inputs(rank, r) for r in range(3)],
                       slotted=True)
        # Only the chosen rows travel: this rank's zero-padded columns of their sums over both workers; with an
        # even D, its columns without padding. The input is left as it was (CPU: all-reduced in a copy).
        x = _inputs(rank, 0)[0]
        before = x.clone()
        even = reduce_scatter_cols(x[:, :10], 2, rows=ROWS).numpy().copy()
        res.append(bool(torch.equal(x, before)))
        res.append(even)
        res.append([reduce_scatter_cols(x, 2, rows=ROWS, method=how).numpy().copy()  # both paths, on gloo
                    for how in ("all_reduce", "reduce_scatter")])
        # A row -1 is a domain this rank did not see: zeros from it (rank 0 sends row 0 and zeros, rank 1 rows 0, 2).
        mixed = torch.tensor([0, -1]) if rank == 0 else ROWS
        res.append([reduce_scatter_cols(x, 2, rows=mixed, method=how).numpy().copy()
                    for how in ("all_reduce", "reduce_scatter")])
        res.append(slotted)
        q.put((rank, res))
    finally:
        dist.destroy_process_group()


class _Single:
    rank, world, device = 0, 1, torch.device("cpu")

    def all_reduce(self, t):
        return t

    def reduce_scatter_cols(self, x, rows=None, workspace=None):
        return reduce_scatter_cols(x, 1, rows, workspace)

    def gather(self, obj):
        return [obj]


@pytest.mark.parametrize("sketched", [SKETCHED, ONLY_SECOND], ids=["both_shards", "second_shard_only"])
def test_two_gloo_workers_equal_one_process_on_the_union(sketched):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, q, sketched)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    union = []
    for r in range(3):
        a, b = _inputs(0, r), _inputs(1, r)
        union.append((a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]))
    single = _run(RoundReducer(_Single(), M, D, sketched), union)
    both = np.pad((_inputs(0, 0)[0] + _inputs(1, 0)[0])[ROWS].numpy(), ((0, 0), (0, 1)))  # D = 11 → 2 × 6 columns
    mixed = np.pad(torch.stack([_inputs(0, 0)[0][0] + _inputs(1, 0)[0][0], _inputs(1, 0)[0][2]]).numpy(),
                   ((0, 0), (0, 1)))
    slotted = {rank: results[rank].pop() for rank in (0, 1)}
    for rank in (0, 1):
        for got in results[rank].pop():
            np.testing.assert_allclose(got, mixed[:, 6 * rank:6 * (rank + 1)], rtol=1e-6, atol=1e-6)
    for rank in (0, 1):
        for got in results[rank].pop():
            np.testing.assert_allclose(got, both[:, 6 * rank:6 * (rank + 1)], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(results[rank].pop(), both[:, 5 * rank:5 * (rank + 1)], rtol=1e-6, atol=1e-6)
        assert results[rank].pop(), "reduce_scatter_cols changed its input"
    for r in range(3):
        # every worker holds the same terms, equal to one process on the union, whether the sums come by domain
        # or in a slotted capture's rows
        for got in (results[0][r], results[1][r], slotted[0][r], slotted[1][r]):
            want = single[r]
            assert got["counts"].tolist() == want["counts"].tolist()
            assert got["present"].tolist() == want["present"].tolist()
            np.testing.assert_allclose(got["gram"], want["gram"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["eval_align"], want["eval_align"], rtol=1e-5, atol=1e-6)
            assert got["eval_sq"] == want["eval_sq"] or abs(got["eval_sq"] - want["eval_sq"]) < 1e-4 * want["eval_sq"]
            np.testing.assert_allclose(got["means"], want["means"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["gram_sketched"], want["gram_sketched"], rtol=1e-5, atol=1e-6)
    # the sketched columns' Gram is that of the estimates' sketched columns (domains keep their last estimate)
    est = np.zeros((M, D))
    for r in range(3):
        present = single[r]["present"]
        est[present] = np.nan_to_num(single[r]["means"])[present]
        sk = est[:, sketched.numpy()]
        np.testing.assert_allclose(single[r]["gram_sketched"], sk @ sk.T, rtol=1e-4, atol=1e-5)
        assert np.abs(single[r]["gram_sketched"]).max() < np.abs(single[r]["gram"]).max() + 1e-9
    for r in range(3):
        assert not single[r]["present"][r % M] and single[r]["present"][(r + 1) % M]
    assert single[2]["counts"][0] > 0 and not single[2]["present"][0]  # the NaN round: seen, but not used
    assert not results[0][2]["present"][0] and np.isfinite(results[0][2]["gram"]).all()


def test_slotted_sums_give_the_same_terms_in_one_process():
    """One worker: the sums in a slotted capture's rows (rows -1 for unseen domains, a garbage row past the round's)
    give the terms of the same sums by domain, round after round — the present rows formed in place when they
    are the round's first rows, the gathered path when a non-finite domain is left out."""
    union = []
    for r in range(3):
        a, b = _inputs(0, r), _inputs(1, r)
        union.append((a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]))
    by_domain = _run(RoundReducer(_Single(), M, D, SKETCHED), union)
    slotted = _run(RoundReducer(_Single(), M, D, SKETCHED), union, slotted=True)
    for got, want in zip(slotted, by_domain, strict=True):
        assert got["present"].tolist() == want["present"].tolist()
        for key in ("gram", "gram_sketched", "eval_align", "means"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert not slotted[2]["present"][0] and slotted[2]["counts"][0] > 0  # the NaN domain: seen, not used
