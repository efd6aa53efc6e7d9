"""Report figures (matplotlib, Agg backend: no display needed). Each function takes plain data parsed
from a run directory and writes one PNG; it returns the path, or None when the run has no such data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers, Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _legend(ax: Any, n: int) -> None:
    if n <= 24:
        ax.legend(fontsize=7, ncol=1 if n <= 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  title="domain", title_fontsize=8, frameon=False)


def mixture_over_steps(steps: Sequence[float], mixtures: Sequence[Sequence[float]], domains: Sequence[str],
                       path: Path, title: str = "Mixture weights over training") -> Path | None:
    """Stacked area: the share of each domain in the sampling mixture p at each round."""
    if not steps or not mixtures:
        return None
    p = np.asarray(mixtures, dtype=float)
    if p.ndim != 2 or p.shape[1] != len(domains):
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.asarray(steps, dtype=float)
    if len(x) == 1:  # a single round: show it as a flat band so the plot is not empty
        x = np.array([x[0], x[0] + 1])
        p = np.vstack([p, p])
    ax.stackplot(x, p.T, labels=list(domains), colors=_colors(len(domains)), step=None)
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("mixture weight p")
    ax.set_title(title)
    _legend(ax, len(domains))
    return _save(fig, path)


def losses(metrics: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Training loss per logged step, and evaluation loss per domain (thin) and their mean (thick)."""
    train = [(m["step"], m["train_loss"]) for m in metrics
             if m.get("train_loss") is not None and m.get("step") is not None]
    evals = [m for m in metrics if m.get("eval_loss") is not None and m.get("step") is not None]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        s, v = zip(*train, strict=True)
        ax.plot(s, v, color="tab:blue", lw=1)
    ax.set_title("Training loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax = axes[1]
    if evals:
        names = sorted({n for m in evals for n in (m.get("eval_loss_by_domain") or {})},
                       key=lambda n: (0, int(n), n) if n.lstrip("-").isdigit() else (1, 0, n))
        for name, color in zip(names, _colors(len(names)), strict=True):
            pts = [(m["step"], m["eval_loss_by_domain"][name]) for m in evals
                   if name in (m.get("eval_loss_by_domain") or {})]
            if pts:
                s, v = zip(*pts, strict=True)
                ax.plot(s, v, lw=0.8, alpha=0.7, color=color, label=name)
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], lw=2.5, color="black",
                label="mean", marker="o", ms=3)
        _legend(ax, len(names) + 1)
    ax.set_title("Held-out loss per domain")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    return _save(fig, path)


def domain_sizes(domains: Sequence[str], sizes: Sequence[int], path: Path,
                 weights: Sequence[float] | None = None) -> Path | None:
    """Share of documents per domain, next to the final mixture weight when there is one."""
    if not domains:
        return None
    n = np.asarray(sizes, dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(domains) + 3), 4))
    x = np.arange(len(domains))
    width = 0.4 if weights is not None else 0.8
    ax.bar(x - (width / 2 if weights is not None else 0), n / max(n.sum(), 1), width, label="share of documents",
           color="tab:gray")
    if weights is not None:
        ax.bar(x + width / 2, weights, width, label="final mixture weight", color="tab:orange")
    for xi, ni in zip(x, n, strict=True):
        ax.annotate(f"{int(ni)}", (xi, 0), xytext=(0, -22), textcoords="offset points", ha="center", fontsize=6,
                    color="dimgray")
    ax.set_xticks(x, list(domains), fontsize=7)
    ax.set_xlabel("domain (documents below)")
    ax.set_ylabel("share")
    ax.set_title("Domain sizes and final mixture")
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def k_sweep(rows: Sequence[dict[str, Any]], path: Path, best_k: int | None = None) -> Path | None:
    """Held-out loss against k for each (λ, strategy), with the silhouette of each k on a second axis."""
    usable = [r for r in rows if r.get("k") is not None]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in usable:
        groups.setdefault((r.get("lam"), r.get("strategy")), []).append(r)
    for (lam, strategy), members in sorted(groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][0] or 0)):
        pts = sorted((r["k"], r["eval_loss"], r.get("status")) for r in members
                     if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"]))
        if not pts:
            continue
        ks, ls, st = zip(*pts, strict=True)
        line, = ax.plot(ks, ls, marker="o", label=f"{strategy}, λ={lam:g}" if lam is not None else str(strategy))
        stopped = [(k, v) for k, v, s in pts if s == "stopped"]
        if stopped:  # hollow markers: the scheduler ended these early, loss measured at fewer steps
            sk, sv = zip(*stopped, strict=True)
            ax.scatter(sk, sv, s=70, facecolors="white", edgecolors=line.get_color(), zorder=3)
    failed = sorted({r["k"] for r in usable if r.get("status") == "failed"})
    for k in failed:
        ax.axvline(k, color="red", lw=0.8, ls=":")
    if best_k is not None:
        ax.axvline(best_k, color="green", lw=1.2, ls="--", label=f"best k = {best_k}")
    ax.set_xticks(sorted({int(r["k"]) for r in usable}))
    ax.set_xlabel("k (number of domains)")
    ax.set_ylabel("held-out loss (proxy run)")
    sil = sorted({(r["k"], r["silhouette"]) for r in usable if r.get("silhouette") is not None})
    handles, labels = ax.get_legend_handles_labels()
    if sil:
        ax2 = ax.twinx()
        ks, ss = zip(*sil, strict=True)
        (sl,) = ax2.plot(ks, ss, color="gray", ls="--", marker="s", ms=4, label="silhouette")
        ax2.set_ylabel("silhouette (higher = better separated)")
        handles.append(sl)
        labels.append("silhouette")
    ax.legend(handles, labels, fontsize=8, frameon=False, loc="best")
    ax.set_title("Choosing k" + (f" (failed: k={', '.join(map(str, failed))})" if failed else ""))
    return _save(fig, path)


def crosstab(table: dict[str, dict[str, int]], domains: Sequence[str], path: Path) -> Path | None:
    """Heatmap of original domain (rows) × new domain (columns), each row normalised to 1."""
    if not table:
        return None
    originals = sorted(table)
    m = np.array([[float(table[o].get(d, 0)) for d in domains] for o in originals])
    totals = m.sum(axis=1, keepdims=True)
    share = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    h = max(3.5, 0.2 * len(originals) + 1.5)
    w = max(5.0, 0.3 * len(domains) + 3)
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(np.arange(len(domains)), list(domains), fontsize=7)
    ax.set_yticks(np.arange(len(originals)), [f"{o} ({int(t)})" for o, t in zip(originals, totals[:, 0], strict=True)],
                  fontsize=6 if len(originals) > 20 else 8)
    ax.set_xlabel("new domain (k-means cluster)")
    ax.set_ylabel("original domain (documents)")
    ax.set_title("Where each original domain went (row shares)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _save(fig, path)
