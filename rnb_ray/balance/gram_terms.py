"""What a mixing round needs from the per-domain gradients, formed where the gradients are (pure torch:
no Ray, no IO, no collectives — the caller reduces the partial terms).

Every gradient-based strategy only ever uses inner products of the domain-mean gradients ḡ_i (and of the
evaluation gradient g_e), never the vectors themselves:

    G_ij = ḡ_iᵀ ḡ_j          R&B (p = softmax(λ·Gq/‖Gq‖)), Skill-It's gradient graph, DoGE's universal target
    a_i  = ḡ_iᵀ g_e          DGA, DoGE (evaluation target)
    s    = g_eᵀ g_e          (whether the evaluation gradient is zero)

Inner products split over any partition of the coordinates: with the columns of the (m × D) sums spread
over W workers (a reduce-scatter), each worker forms G, a, s on its D/W columns and one all-reduce of those
m × m numbers gives the exact totals. So the vectors never leave the workers' collective, and the mixer
receives kilobytes.

R&B keeps, for every domain, its latest mean gradient (a domain absent from a round keeps the estimate of
the last round it appeared in): ``DomainEstimates`` holds this worker's columns of those estimates and the
global G over them. Only rows of domains present in the round change, so a round costs |P|·m·D/W
multiply-adds (P: the round's domains), not m²·D/W, and G's other entries are carried over.

The reference that this must equal — the mixer's old computation on the full vectors — is
``gram.gram_terms_dense``.
"""

from __future__ import annotations

from typing import Any

import torch


def nonfinite_rows(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(m,) float: 1 where a row holds a NaN/inf (its sum is then non-finite, or it overflows, equally unusable).
    ``rows``: check only these (the others count as finite: rows no worker wrote are zeros)."""
    if x.numel() == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    if rows is None:
        return (~torch.isfinite(x.sum(dim=1))).double().cpu()  # overflow to inf is as unusable as a NaN
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    if rows.numel():
        sums = torch.stack([x[r].sum() for r in rows.tolist()])  # row views: no gather copy; one device sync
        out[rows.cpu()] = (~torch.isfinite(sums)).double().cpu()
    return out


class DomainEstimates:
    """This worker's columns of each domain's latest mean gradient, and the Gram matrix over all of them.

    Per round: ``update_rows(shard, counts, ok)`` replaces the estimates of the domains present (count > 0 and
    finite everywhere: ``ok``) by this round's means and returns the partial |P| × m block est_P estᵀ on these
    columns; the caller all-reduces it and hands the total to ``set_rows``. ``eval_partials`` gives a_i, s on
    these columns. A domain never seen has a zero estimate (its row of G is zero), as in the paper's start.
    """

    def __init__(self, m: int, cols: int, device: torch.device | str = "cpu", sketched: torch.Tensor | None = None,
                 track_sketched: bool | None = None):
        self.m, self.cols = m, cols
        self.est = torch.zeros(m, cols, dtype=torch.float32, device=device)
        self.gram = torch.zeros(m, m, dtype=torch.float64)
        # The Gram matrix over the sketched columns alone (``sketched``: which of these columns are sketched;
        # None: no sketch): what the sketch's error estimate scales with. Exact rows add no error.
        # ``track_sketched``: whether to return T's block at all — it must be the same on every worker (the
        # blocks are all-reduced), so a worker whose columns are all exact (a row hash's exact rows fill the
        # first shards) still returns zeros for T when another worker's columns are sketched. Default: whether
        # these columns hold any sketched numbers.
        has = sketched is not None and bool(sketched.any())
        self.tracks_sketched = has if track_sketched is None else bool(track_sketched)
        # Sketched and exact columns come in contiguous runs (a row hash stores its exact rows first), so G's
        # block is summed from GEMMs over column slices (views): the sketched part is T, and G costs no more
        # than without the estimate.
        self._runs = column_runs(sketched.cpu()) if has else [(0, cols, False)]
        self.gram_sketched = torch.zeros(m, m, dtype=torch.float64)
        self.seen = torch.zeros(m, dtype=torch.bool)
        self.flops = 0
        self._present = torch.empty(0, cols, dtype=torch.float32, device=device)  # update_rows' gather buffer

    def update_rows(self, shard: torch.Tensor, counts: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows P, partial block (|P|, m) float64 on these columns). ``shard``: (m, cols) summed gradients."""
        rows = torch.nonzero(ok & (counts > 0)).reshape(-1)
        if rows.numel() == 0:
            return rows, torch.zeros(0, self.block_width, dtype=torch.float64)
        idx = rows.to(self.est.device)
        scale = (1.0 / counts[rows].double()).to(torch.float32).to(self.est.device)
        # One gather of the present rows, scaled in place, written back once (not gathered again: at 64
        # domains every extra pass over |P| × cols is tens of MB). The gather goes into a buffer kept across
        # rounds: a fresh |P| × cols tensor (tens of MB) is a fresh mapping whose first touch page-faults on
        # every round, which cost as much as the copy itself.
        if self._present.shape[0] < rows.numel() or self._present.device != shard.device:
            self._present = torch.empty(rows.numel(), self.cols, dtype=torch.float32, device=shard.device)
        present = self._present[: rows.numel()]
        torch.index_select(shard if shard.dtype == torch.float32 else shard.float(), 0, idx, out=present)
        present.mul_(scale[:, None])
        self.est.index_copy_(0, idx, present)
        self.seen[rows] = True
        self.flops += 2 * rows.numel() * self.m * self.cols
        if not self.tracks_sketched:
            return rows, (present @ self.est.T).double().cpu()  # float32 GEMM (BLAS-blocked sums)
        exact = torch.zeros(rows.numel(), self.m, dtype=torch.float32, device=self.est.device)
        sk = torch.zeros_like(exact)
        for a, b, is_sketched in self._runs:  # (|P|, 2m): G's block, then T's (the sketched columns alone)
            (sk if is_sketched else exact).addmm_(present[:, a:b], self.est[:, a:b].T)
        return rows, torch.cat([exact + sk, sk], dim=1).double().cpu()

    @property
    def block_width(self) -> int:
        """Numbers per present row that ``update_rows`` returns (m, or 2m with the sketched columns' Gram)."""
        return 2 * self.m if self.tracks_sketched else self.m

    def set_rows(self, rows: torch.Tensor, block: torch.Tensor) -> None:
        """Write the all-reduced block into G (both its rows and, by symmetry, its columns)."""
        if rows.numel():
            m = self.m
            self.gram[rows, :] = block[:, :m]
            self.gram[:, rows] = block[:, :m].T
            if self.tracks_sketched:
                self.gram_sketched[rows, :] = block[:, m:]
                self.gram_sketched[:, rows] = block[:, m:].T

    def eval_partials(self, eval_shard: torch.Tensor) -> torch.Tensor:
        """(m + 1,) float64 on these columns: est·g_e for every domain, then g_eᵀg_e."""
        e = eval_shard.to(self.est.device).float()
        self.flops += 2 * (self.m + 1) * self.cols
        return torch.cat([(self.est @ e).double(), (e @ e).double().reshape(1)]).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"est": self.est.cpu().clone(), "gram": self.gram.clone(), "seen": self.seen.clone(),
                "gram_sketched": self.gram_sketched.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        est = torch.as_tensor(state["est"])
        if tuple(est.shape) != tuple(self.est.shape):
            raise ValueError(f"saved estimates have shape {tuple(est.shape)}, this worker's are {tuple(self.est.shape)}")
        self.est.copy_(est)
        self.gram.copy_(torch.as_tensor(state["gram"], dtype=torch.float64))
        self.seen.copy_(torch.as_tensor(state["seen"], dtype=torch.bool))
        if "gram_sketched" in state:  # absent in checkpoints from before the error estimate used it
            self.gram_sketched.copy_(torch.as_tensor(state["gram_sketched"], dtype=torch.float64))


def column_runs(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    """The maximal runs ``[a, b)`` of equal values of a bool vector, with their value."""
    n = int(mask.numel())
    if n == 0:
        return []
    edges = (torch.nonzero(mask[1:] != mask[:-1]).reshape(-1) + 1).tolist()
    bounds = [0, *edges, n]
    return [(a, b, bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
