"""Helpers shared by the baseline strategies (DGA, DoGE, Skill-It, Aioli): simplex steps, alignment scores,
and reading their options with errors that name the option (numpy; ``load_matrix`` may read a .npy/.json file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rnb_ray.balance.gram import softmax
from rnb_ray.errors import RnbError


def multiplicative_update(p: np.ndarray, score: np.ndarray, eta: float) -> np.ndarray:
    """Exponentiated-gradient step on the simplex: p_i ∝ p_i · exp(eta · score_i)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, None)
    return softmax(np.log(p) + eta * np.asarray(score, dtype=np.float64))


def target_weights(q: np.ndarray) -> np.ndarray:
    """m · q: 1 for every domain when the evaluation set is balanced (the papers' uniform sum)."""
    q = np.asarray(q, dtype=np.float64)
    return q * len(q) / q.sum()


def scaled(scores: np.ndarray, scale: str) -> np.ndarray:
    """'raw' keeps the inner products; 'max' divides by the largest |score| so eta is scale-free."""
    if scale == "raw":
        return scores
    top = float(np.max(np.abs(scores))) if scores.size else 0.0
    return scores / top if top > 0 else scores


def option(options: dict[str, Any], name: str, default: Any, kind: type, *, strategy: str) -> Any:
    """Read one strategy option with a clear error naming it."""
    value = options.pop(name, default)
    if value is None or kind is object:
        return value
    try:
        if kind is float:
            out = float(value)
            if not np.isfinite(out):
                raise ValueError(value)
            return out
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError(value)
            return int(float(value))
        if kind is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise RnbError(
            f"strategy option '{name}' of {strategy} must be a {kind.__name__}, got {value!r}",
            where="strategy_options",
            fix=f"give {name} as a {kind.__name__}",
        ) from None


def reject_unknown(options: dict[str, Any], *, strategy: str, known: list[str]) -> None:
    if options:
        raise RnbError(
            f"unknown strategy option(s) for {strategy}: {', '.join(sorted(options))}",
            where="strategy_options",
            fix=f"{strategy} accepts {', '.join(known)}",
        )


def check_range(name: str, value: float, lo: float, hi: float, *, strategy: str, lo_open: bool = False,
                hi_open: bool = False) -> None:
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise RnbError(
            f"strategy option '{name}' of {strategy} is {value}, outside {left}{lo}, {hi}{right}",
            where="strategy_options",
            fix=f"choose {name} in {left}{lo}, {hi}{right}",
        )


def alignment(stats: Any) -> tuple[np.ndarray, str | None]:
    """<ḡ_i, g_eval> per domain from the round's terms; 0 for domains absent from the round. Reason when
    unusable."""
    if stats.gram is None:
        return np.zeros(0), "no per-domain training gradients in this round"
    if stats.eval_align is None or stats.eval_sq is None:
        return np.zeros(0), "no evaluation gradient in this round"
    align = np.asarray(stats.eval_align, dtype=np.float64)
    present = _present(stats)
    if not np.isfinite(stats.eval_sq) or not np.all(np.isfinite(align[present])):
        return np.zeros(0), "evaluation gradient is not finite"
    if not present.any():
        return np.zeros(0), "no domain had a finite gradient in this round"
    if stats.eval_sq == 0:
        return np.zeros(0), "evaluation gradient is zero"
    scores = np.zeros(len(present))
    scores[present] = align[present]
    return scores, None


def weighted_alignment(stats: Any, weights: np.ndarray) -> tuple[np.ndarray, str | None]:
    """<ḡ_j, Σ_i w_i ḡ_i> over the domains present (DoGE's universal target), from G alone."""
    if stats.gram is None:
        return np.zeros(0), "no per-domain training gradients in this round"
    present = _present(stats)
    if not present.any():
        return np.zeros(0), "no domain had a finite gradient in this round"
    G = np.asarray(stats.gram, dtype=np.float64)
    w = np.where(present, np.asarray(weights, dtype=np.float64), 0.0)
    if not float(w @ G @ w) > 0:  # ‖target‖² (0 for a zero target)
        return np.zeros(0), "evaluation gradient is zero"
    scores = np.zeros(len(present))
    scores[present] = (G @ w)[present]
    return scores, None


def _present(stats: Any) -> np.ndarray:
    counts = np.asarray(stats.counts)
    if stats.present is None:
        return counts > 0
    return np.asarray(stats.present, dtype=bool) & (counts > 0)


def load_matrix(value: Any, *, name: str, strategy: str, shape: tuple[int | None, int]) -> np.ndarray:
    """A matrix option given inline (nested list) or as a .npy / .json file path."""
    if isinstance(value, str | Path):
        path = Path(value)
        if not path.is_file():
            raise RnbError(f"{strategy} option {name}: file not found", where=str(path),
                           fix="give an existing .npy or .json file, or the matrix inline")
        value = np.load(path) if path.suffix == ".npy" else json.loads(path.read_text())
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RnbError(f"{strategy} option {name} is not a numeric matrix", where="strategy_options",
                       fix=f"give {name} as a list of rows of numbers") from None
    rows, cols = shape
    if arr.ndim != 2 or arr.shape[1] != cols or (rows is not None and arr.shape[0] != rows):
        want = f"({rows if rows is not None else 'N'}, {cols})"
        raise RnbError(f"{strategy} option {name} has shape {arr.shape}, expected {want}",
                       where="strategy_options", fix=f"give one row per {'domain' if rows else 'basis'}"
                       f" with {cols} entries (one per domain)")
    if not np.all(np.isfinite(arr)):
        raise RnbError(f"{strategy} option {name} has non-finite entries", where="strategy_options",
                       fix="use finite numbers")
    return arr
