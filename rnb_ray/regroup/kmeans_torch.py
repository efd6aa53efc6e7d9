"""The Lloyd step in torch, for a GPU: ``kmeans.py``'s assignment and per-centroid sums on a device.

Pure math (torch and numpy; no Ray, no IO). ``TorchRows`` puts a block of rows on the device once; each
Lloyd step then sends the centroids (k × d) there and brings back a ``kmeans.Partial`` (k × d sums, k counts,
a few numbers), so the fit around it (``clustering.fit``) is the same whichever device runs the step.

* Assignment: the products ``kmeans.Scorer`` computes — ``x·(−2c) + ‖c‖²`` (euclidean) or ``x·c`` (cosine),
  in the rows' precision — with TF32 switched off for them (TF32 keeps 10 mantissa bits: enough to move
  points between nearby centroids), then argmin/argmax; ties go to the lower id, as in numpy.
* Sums: a one-hot ``k × chunk`` matrix times the chunk's rows, in float32, accumulated in float64. That is
  as many FLOPs as the assignment again — milliseconds on a GPU — and deterministic, where ``index_add_``
  is not on CUDA (atomic adds land in a varying order).

``device="cpu"`` runs this same code on the CPU, which is how the tests compare it with ``kmeans.py``; a fit
on CPU uses ``kmeans.py`` (numpy, faster there: its sums cost n·d, not n·k·d).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np

from rnb_ray.regroup import kmeans as km

TORCH_CHUNK = 65_536  # rows per product on the device at most
SCORES_BYTES = 256 << 20  # and at most this much for the chunk × k scores (and as much for the one-hot matrix)
RESIDENT_FRACTION = 0.5  # rows stay on the device when they take at most this share of its free memory


def cuda_available() -> bool:
    """Whether this process sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Full float32 matrix products (no TF32) inside the block; the process setting is restored after."""
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class TorchRows:
    """Rows on a torch device for the whole fit; each method is one pass over them.

    The rows are copied to the device once when they fit in ``RESIDENT_FRACTION`` of its free memory,
    otherwise streamed from host memory a chunk at a time every pass.
    """

    def __init__(self, X: np.ndarray, device: str = "cuda", chunk: int = TORCH_CHUNK):
        import torch

        self.host = np.ascontiguousarray(X)
        self.device = torch.device(device)
        self.chunk = chunk
        self.n = len(X)
        with warnings.catch_warnings():  # rows from Arrow are read-only; nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.from_numpy(self.host)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.host.nbytes <= RESIDENT_FRACTION * free:
                rows = rows.to(self.device)
        self.rows = rows  # on the device, or in host memory (streamed)

    def _chunks(self, k: int) -> Iterator[tuple[int, object]]:
        step = max(1, min(self.chunk, SCORES_BYTES // (4 * k)))
        for s in range(0, self.n, step):
            yield s, self.rows[s:s + step].to(self.device)

    def _prepare(self, C: np.ndarray, metric: str):
        import torch

        if metric == "cosine":
            C = km.normalize_rows(C)
        Cx = torch.from_numpy(np.ascontiguousarray(C)).to(self.device, self.rows.dtype)
        if metric == "cosine":
            return Cx.T.contiguous(), None
        return (-2.0 * Cx).T.contiguous(), (Cx * Cx).sum(1)

    @staticmethod
    def _nearest(x, W, c_sq, metric: str):
        """Labels (int64) and float64 distances of the rows ``x``, on the device."""
        import torch

        scores = x @ W
        rows = torch.arange(len(x), device=x.device)
        if metric == "cosine":
            labels = scores.argmax(1)
            xn = torch.linalg.vector_norm(x, dim=1).double()
            best = scores[rows, labels].double()
            dist = 1.0 - best / torch.where(xn > 0, xn, torch.ones_like(xn))
        else:
            scores += c_sq
            labels = scores.argmin(1)
            x_sq = (x * x).sum(1).double()
            dist = torch.clamp(x_sq + scores[rows, labels].double(), min=0.0)
        return labels, dist

    def assign(self, C: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``kmeans.assign`` on the device: every row's nearest centroid and distance, as numpy arrays."""
        labels = np.empty(self.n, dtype=np.int64)
        dist = np.empty(self.n, dtype=np.float64)
        with exact_fp32():
            W, c_sq = self._prepare(C, metric)
            for s, x in self._chunks(len(C)):
                lab, d = self._nearest(x, W, c_sq, metric)
                labels[s:s + len(x)] = lab.cpu().numpy()
                dist[s:s + len(x)] = d.cpu().numpy()
        return labels, dist

    def partial(self, C: np.ndarray, metric: str, with_moments: bool = False) -> km.Partial:
        """``kmeans.partial_step`` on the device: k × d sums (float64), counts, inertia, moments."""
        import torch

        k, d = C.shape
        f64 = dict(dtype=torch.float64, device=self.device)
        sums = torch.zeros((k, d), **f64)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        inertia = torch.zeros((), **f64)
        m_sum, m_sq = torch.zeros(d, **f64), torch.zeros(d, **f64)
        with exact_fp32():
            W, c_sq = self._prepare(C, metric)
            for _, x in self._chunks(k):
                labels, dist = self._nearest(x, W, c_sq, metric)
                onehot = torch.zeros((k, len(x)), dtype=x.dtype, device=self.device)
                onehot[labels, torch.arange(len(x), device=self.device)] = 1
                sums += (onehot @ x).double()
                counts += torch.bincount(labels, minlength=k)
                inertia += dist.sum()
                if with_moments:
                    x64 = x.double()
                    m_sum += x64.sum(0)
                    m_sq += (x64 * x64).sum(0)
        moments = (m_sum.cpu().numpy(), m_sq.cpu().numpy()) if with_moments else None
        return km.Partial(sums.cpu().numpy(), counts.cpu().numpy(), float(inertia), self.n, moments)

    def far(self, row_ids: np.ndarray, C: np.ndarray, metric: str, m: int) -> list[km.FarPoint]:
        """``kmeans.farthest_points`` with the distances computed on the device."""
        if m <= 0 or self.n == 0:
            return []
        labels, dist = self.assign(C, metric)
        return km.pick_farthest(self.host, row_ids, labels, dist, m)
