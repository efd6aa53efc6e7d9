"""Sweep criteria and the results table (pure: no Ray, no IO).

The paper (R&B, Sec. 3.1 and Fig. 2) picks the number of domains k by training a short proxy model per k
under stratified sampling and taking the lowest held-out loss; it also reports that the silhouette score
of each k's clustering — free, no training — correlated with that loss on 3 of 4 datasets. This module
turns trial outcomes into one row per trial, picks the best configuration, and measures how well the
cheap criterion agrees with the trained one, so users learn when they can skip training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Columns of results.csv, in order (the table plus what a user needs to debug a trial).
COLUMNS: tuple[str, ...] = (
    "trial_id", "k", "lam", "strategy", "status", "eval_loss", "best_eval_loss", "steps", "silhouette",
    "inertia", "smallest_domain", "largest_domain", "seconds", "error",
)


@dataclass
class TrialRow:
    """One trial of the sweep, as the results table shows it.

    ``status`` is ``completed`` (ran all steps), ``stopped`` (the scheduler ended it early because it
    was doing worse than its peers at the same step) or ``failed`` (raised; ``error`` says why).
    ``eval_loss`` is the last held-out loss the trial reported, ``best_eval_loss`` the lowest.
    """

    trial_id: str
    k: int
    lam: float
    strategy: str
    status: str
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    steps: int | None = None
    silhouette: float | None = None
    inertia: float | None = None
    smallest_domain: int | None = None
    largest_domain: int | None = None
    seconds: float | None = None
    error: str | None = None
    losses: dict[int, float] = field(default_factory=dict)  # step -> held-out loss, every evaluation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("losses")
        return d


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def sort_rows(rows: Iterable[TrialRow]) -> list[TrialRow]:
    return sorted(rows, key=lambda r: (r.k, r.lam, r.strategy, r.trial_id))


def pick_best(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The trial with the lowest final held-out loss among those that ran every step.

    Trials the scheduler stopped early reported their loss at fewer steps, so comparing it with a
    finished trial's loss would favour whoever ran longest; they count only when no trial finished.
    Ties go to the smaller k (fewer domains: cheaper mixing, the paper's preference for simple groupings).
    """
    with_loss = [r for r in rows if r.status != "failed" and _finite(r.eval_loss)]
    finished = [r for r in with_loss if r.status == "completed"]
    pool = finished or with_loss
    if not pool:
        return None
    return min(pool, key=lambda r: (r.eval_loss, r.k, r.lam, r.strategy))


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1-based), ties sharing the mean of their positions — Spearman's convention."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        for t in range(i, j + 1):
            ranks[order[t]] = mean_rank
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None with fewer than 3 points or when either side is constant (undefined)."""
    if len(x) != len(y):
        raise ValueError(f"pearson: lengths differ ({len(x)} vs {len(y)})")
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    return pearson(_ranks(list(x)), _ranks(list(y)))


def silhouette_agreement(rows: Sequence[TrialRow]) -> list[dict[str, Any]]:
    """For each (λ, strategy) group: how the silhouette of each k relates to the trained loss.

    Higher silhouette is better and lower loss is better, so a useful cheap criterion shows a
    *negative* correlation. ``agrees`` says whether the k with the highest silhouette is also the k with
    the lowest loss — the question a user asks before skipping the training sweep.
    Losses are compared at the same step: the last evaluation step every trial of the group reached
    (``at_step``), so trials the scheduler stopped early are compared fairly with the finished ones.
    """
    groups: dict[tuple[float, str], list[TrialRow]] = {}
    for r in rows:
        if r.status == "failed" or not _finite(r.eval_loss) or not _finite(r.silhouette):
            continue
        groups.setdefault((r.lam, r.strategy), []).append(r)
    out = []
    for (lam, strategy), members in sorted(groups.items()):
        common = set.intersection(*(set(r.losses) for r in members)) if all(r.losses for r in members) else set()
        at = max(common) if common else None
        loss_of = {id(r): float(r.losses[at]) if at is not None else float(r.eval_loss)  # type: ignore[arg-type]
                   for r in members}
        sil = [float(r.silhouette) for r in members]  # type: ignore[arg-type]
        loss = [loss_of[id(r)] for r in members]
        best_sil = max(members, key=lambda r: (r.silhouette, -r.k))
        best_loss = min(members, key=lambda r: (loss_of[id(r)], r.k))
        out.append({
            "lam": lam,
            "strategy": strategy,
            "n": len(members),
            "at_step": at,
            "pearson": pearson(sil, loss),
            "spearman": spearman(sil, loss),
            "k_best_silhouette": best_sil.k,
            "k_best_loss": best_loss.k,
            "agrees": best_sil.k == best_loss.k,
        })
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) >= 1e4 or abs(v) < 1e-3 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def format_table(rows: Sequence[TrialRow], best: TrialRow | None = None) -> str:
    """A fixed-width console table, one line per trial; the best trial is marked with '*'."""
    cols = ("k", "lam", "strategy", "status", "eval_loss", "steps", "silhouette", "inertia",
            "smallest_domain", "largest_domain", "seconds")
    heads = ("k", "λ", "strategy", "status", "eval loss", "steps", "silhouette", "inertia", "min dom",
             "max dom", "time s")
    body = []
    for r in rows:
        d = r.to_dict()
        cells = [_fmt(d[c]) for c in cols]
        if r.status == "failed" and r.error:
            cells[3] = "FAILED"
        body.append(("*" if best is not None and r.trial_id == best.trial_id else " ", cells))
    widths = [max(len(h), *(len(c[i]) for _, c in body)) if body else len(h) for i, h in enumerate(heads)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    for mark, cells in body:
        lines.append(mark + " " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    for r in rows:
        if r.status == "failed":
            lines.append(f"  trial {r.trial_id} (k={r.k}, λ={_fmt(r.lam)}, {r.strategy}) failed: {r.error}")
    return "\n".join(lines)


def csv_rows(rows: Sequence[TrialRow]) -> list[list[str]]:
    """Header + one list of strings per trial, in ``COLUMNS`` order (empty string for missing)."""
    out = [list(COLUMNS)]
    for r in rows:
        d = r.to_dict()
        out.append(["" if d[c] is None else (repr(d[c]) if isinstance(d[c], float) else str(d[c]))
                    for c in COLUMNS])
    return out
