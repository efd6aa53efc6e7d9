"""A mixing round's reduction, on the workers, with the training's own collectives (no Ray).

At the end of a round each worker holds its own per-domain gradient sums (from ``DomainGradCapture``, exact or
sketched: a row per domain, or with a slotted capture a row per domain this worker saw in the round, ``rows``
mapping domains to them). Instead of shipping them to the mixer actor, the workers

1. all-reduce one small vector: the example counts (so every worker knows which domains some worker saw);
2. reduce-scatter those domains' rows of the sums (zeros from a worker that did not see one) by columns
   (``Runtime.reduce_scatter_cols``: nccl's reduce-scatter on GPU; on CPU a gloo all-reduce of the rows, each
   worker keeping its columns), so each holds their global sums on 1/W of the coordinates (and the evaluation
   gradient likewise, when needed), and all-reduce which of them are non-finite anywhere;
3. replace the present domains' estimates by this round's means on their columns and form their partial
   rows of G (and ḡ_iᵀg_e, g_eᵀg_e) — ``gram_terms.DomainEstimates``;
4. all-reduce those |P| × m (+ m + 1) numbers.

Every worker then holds the same G, counts and evaluation terms: kilobytes, which is all the mixer receives.
With one worker the collectives are no-ops and nothing is copied.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from rnb_ray.balance.gram_terms import DomainEstimates, nonfinite_rows
from rnb_ray.balance.runtime import Runtime, Workspace


class RoundReducer:
    """One per worker; ``reduce`` is called by every worker at the end of every round."""

    def __init__(self, rt: Runtime, m: int, dim: int, sketched: torch.Tensor | None = None):
        """``sketched``: (dim,) bool, the columns that hold sketched (estimated) numbers (``DomainGradCapture.
        sketched_columns``); their Gram matrix comes back as ``gram_sketched`` for the error estimate."""
        self.rt, self.m, self.dim = rt, m, dim
        self.cols = -(-dim // rt.world)
        mine, track = None, sketched is not None and bool(sketched.any())  # the same on every worker
        if track:  # this worker's columns of the reduce-scatter (may all be exact: it then adds zeros to T)
            padded = torch.zeros(self.cols * rt.world, dtype=torch.bool)
            padded[:dim] = sketched
            mine = padded[rt.rank * self.cols:(rt.rank + 1) * self.cols]
        self.estimates = DomainEstimates(m, self.cols, device=rt.device, sketched=mine, track_sketched=track)
        self.seconds = 0.0  # this worker's wall time in the reduction (collectives + its share of the Gram)
        # of which waiting in the round's first collective for the other workers to end their step: the
        # workers' skew, which a plain step would absorb at its next gradient all-reduce instead
        self.seconds_sync = 0.0
        self.bytes_collective = 0  # bytes this worker handed to collectives, cumulative
        self.last_means: torch.Tensor | None = None  # only when asked (debug dumps)
        self.workspace = Workspace()  # the sums' collective buffer, kept across rounds

    def reduce(self, sums: torch.Tensor | None, counts: torch.Tensor, eval_sum: torch.Tensor | None = None,
               eval_count: int = 0, keep_means: bool = False, rows: torch.Tensor | None = None) -> dict[str, Any]:
        """This round's terms, identical on every worker. ``sums``: this worker's sums (read, not kept), row d
        domain d's, or with ``rows`` (m,) domain d's at row ``rows[d]`` (-1: not seen here; a slotted
        ``DomainGradCapture``'s ``slot``)."""
        t0 = time.perf_counter()
        rt, m, dev, multi = self.rt, self.m, self.rt.device, self.rt.world > 1
        # Counts first (one small all-reduce): the domains some worker saw are then known everywhere, and only
        # their rows travel — a round's traffic scales with the domains it touched, not with m.
        small = torch.cat([counts.double().cpu(), torch.tensor([float(eval_count)], dtype=torch.float64)])
        t1 = time.perf_counter()
        small = rt.all_reduce(small.to(dev)).cpu()
        if multi:
            self.seconds_sync += time.perf_counter() - t1
        counts_g, eval_n = small[:m].round().long(), int(small[m])
        seen = torch.nonzero(counts_g > 0).reshape(-1)
        shard, index = None, None  # index: domain → its row of ``shard`` (None: the same row)
        src = None if rows is None else torch.as_tensor(rows).long().cpu()
        if sums is not None:
            if multi:
                shard = rt.reduce_scatter_cols(sums, seen if src is None else src[seen], self.workspace)
                index = torch.full((m,), -1, dtype=torch.long)
                index[seen] = torch.arange(seen.numel())
                self.bytes_collective += shard.numel() * rt.world * shard.element_size()
            else:
                shard, index = sums, src
        eshard = rt.reduce_scatter_cols(eval_sum.reshape(1, -1))[0] if eval_sum is not None else None
        if multi:
            self.bytes_collective += small.numel() * 8 + (eval_sum.numel() * eval_sum.element_size()
                                                           if eval_sum is not None else 0)
        # Non-finite rows, among the domains some worker saw (the others are zeros on every worker): a pass
        # over those rows of this worker's columns, then one more all-reduce of |seen| numbers.
        ok = torch.ones(m, dtype=torch.bool)
        if shard is not None:
            if multi:
                bad = torch.zeros(m, dtype=torch.float64)
                part = nonfinite_rows(shard)  # the seen rows, in order
                if seen.numel():
                    bad[seen] = rt.all_reduce(part.to(dev)).cpu()
                    self.bytes_collective += part.numel() * 8
            else:
                at = seen if index is None else index[seen]
                bad = torch.zeros(m, dtype=torch.float64)
                bad[seen] = nonfinite_rows(shard, at)[at]
            ok = bad == 0
        # Plain numpy copies: a view into a torch tensor's storage (with an offset) does not pickle for Ray.
        out: dict[str, Any] = {"counts": counts_g.numpy().copy(), "present": ((counts_g > 0) & ok).numpy().copy()}
        if shard is None:
            self.seconds += time.perf_counter() - t0
            return out
        if keep_means:
            full = shard
            if index is not None:  # by domain; rows of domains no worker saw stay zero
                full = torch.zeros(m, shard.shape[1], dtype=shard.dtype)
                full[seen] = shard[index[seen]].cpu()
            self.last_means = full.double().cpu() / counts_g.clamp(min=1).double()[:, None]
            self.last_means[~((counts_g > 0) & ok)] = float("nan")
        rows, block = self.estimates.update_rows(shard, counts_g, ok, index)
        parts = [block.reshape(-1)]
        if eshard is not None:
            parts.append(self.estimates.eval_partials(eshard / max(eval_n, 1)))
        vec = rt.all_reduce(torch.cat(parts).to(dev)).cpu()
        if multi:
            self.bytes_collective += vec.numel() * 8
        width = self.estimates.block_width
        n_block = rows.numel() * width
        self.estimates.set_rows(rows, vec[:n_block].view(rows.numel(), width))
        out["gram"] = self.estimates.gram.numpy().copy()
        if self.estimates.tracks_sketched:
            out["gram_sketched"] = self.estimates.gram_sketched.numpy().copy()
        if eshard is not None:
            out["eval_align"] = vec[n_block:n_block + m].numpy().copy()
            out["eval_sq"] = float(vec[n_block + m])
            out["eval_count"] = eval_n
        self.seconds += time.perf_counter() - t0
        return out

    def full_means(self) -> np.ndarray | None:
        """The last round's domain means over every column (debug only: gathers every worker's shard)."""
        if self.last_means is None:
            return None
        shards = self.rt.gather(self.last_means.numpy())
        return np.concatenate(shards, axis=1)[:, : self.dim]

    @property
    def flops(self) -> int:
        return self.estimates.flops
