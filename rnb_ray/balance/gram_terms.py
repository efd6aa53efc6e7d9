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

    def update_rows(self, shard: torch.Tensor, counts: torch.Tensor, ok: torch.Tensor,
                    index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows P, partial block (|P|, m) float64 on these columns). ``shard``: summed gradients on these columns,
        (m, cols), or only some domains' rows with ``index`` (m,) giving each domain's row of it."""
        rows = torch.nonzero(ok & (counts > 0)).reshape(-1)
        if rows.numel() == 0:
            return rows, torch.zeros(0, self.block_width, dtype=torch.float64)
        n = rows.numel()
        src = (rows if index is None else index[rows].long()).tolist()  # each present domain's row of ``shard``
        scale = (1.0 / counts[rows].double()).tolist()
        self.seen[rows] = True
        self.flops += 2 * n * self.m * self.cols
        if sorted(src) == list(range(n)):
            # The present domains' sums are the first |P| rows of ``shard`` (a slotted capture's round, or the
            # collective's buffer): each is scaled straight into its estimate, and G's block is formed from the
            # unscaled rows and scaled afterwards — no gathered copy.
            for r, j, sc in zip(rows.tolist(), src, scale, strict=True):
                torch.mul(shard[j], sc, out=self.est[r])
            return rows, self._row_products(shard[:n])[src] * torch.tensor(scale, dtype=torch.float64)[:, None]
        # Otherwise the present rows are scaled into a buffer kept across rounds and written back once (a fresh
        # |P| × cols tensor, tens of MB, page-faulted on first touch every round, which cost as much as the
        # copy). Row by row: one pass each, about twice as fast as index_select + mul_ + index_copy_ here.
        if self._present.shape[0] < n or self._present.device != shard.device:
            self._present = torch.empty(n, self.cols, dtype=torch.float32, device=shard.device)
        present = self._present[:n]
        for i, (r, j, sc) in enumerate(zip(rows.tolist(), src, scale, strict=True)):
            torch.mul(shard[j], sc, out=present[i])
            self.est[r].copy_(present[i])
        return rows, self._row_products(present)

    def _row_products(self, a: torch.Tensor) -> torch.Tensor:
        """(n, block_width) float64 on these columns: a·estᵀ (float32 GEMMs, BLAS-blocked sums), then, when the
        sketched columns' Gram is tracked, the same over those columns alone."""
        exact = torch.zeros(a.shape[0], self.m, dtype=torch.float32, device=self.est.device)
        if not self.tracks_sketched:
            return add_row_products(exact, a, self.est).double().cpu()
        sk = torch.zeros_like(exact)
        for lo, hi, is_sketched in self._runs:  # (|P|, 2m): G's block, then T's (the sketched columns alone)
            add_row_products(sk if is_sketched else exact, a[:, lo:hi], self.est[:, lo:hi])
        return torch.cat([exact + sk, sk], dim=1).double().cpu()

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


# A round's block is a GEMM with a tiny output (|P| × m) and a huge inner dimension (the columns). For small
# outputs BLAS (MKL on CPU) runs it at a fifth of its speed on other shapes; cutting the columns into chunks
# and summing a batched GEMM over them keeps the cores busy: at 15 domains (11 present, 786,432 columns)
# 13.5 → 2.6 ms, at 29 domains 11.1 → 4.1 ms; from |P|·m ≈ 512 up the plain GEMM is as fast or faster
# (measured on this project's 2-core CPU; ``tests/unit/test_gram_terms.py`` checks both paths agree).
_CHUNK = 12_288
_SMALL_OUTPUT = 512


def add_row_products(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a bᵀ for a (p, n), b (m, n) with n ≫ p·m (views with unit column stride are fine)."""
    p, n = a.shape
    c = n // _CHUNK
    if p * b.shape[0] > _SMALL_OUTPUT or c < 2:
        return out.addmm_(a, b.T)
    cut = c * _CHUNK
    out.add_(torch.bmm(a[:, :cut].unflatten(1, (c, _CHUNK)).transpose(0, 1),
                       b[:, :cut].unflatten(1, (c, _CHUNK)).permute(1, 2, 0)).sum(0))
    if cut < n:
        out.addmm_(a[:, cut:], b[:, cut:].T)
    return out


def column_runs(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    """The maximal runs ``[a, b)`` of equal values of a bool vector, with their value."""
    n = int(mask.numel())
    if n == 0:
        return []
    edges = (torch.nonzero(mask[1:] != mask[:-1]).reshape(-1) + 1).tolist()
    bounds = [0, *edges, n]
    return [(a, b, bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
