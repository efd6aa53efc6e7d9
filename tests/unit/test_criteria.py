"""Sweep criteria: correlations, best-trial choice, the results table."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from rnb_ray.sweep.criteria import (
    COLUMNS,
    TrialRow,
    csv_rows,
    format_table,
    pearson,
    pick_best,
    silhouette_agreement,
    sort_rows,
    spearman,
)


def row(k, loss, sil=None, status="completed", steps=20, lam=3.0, strategy="stratified", **kw):
    return TrialRow(trial_id=f"t{k}_{lam}_{strategy}", k=k, lam=lam, strategy=strategy, status=status,
                    eval_loss=loss, steps=steps, silhouette=sil, **kw)


def test_pearson_and_spearman_match_numpy_and_scipy_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = 2 * x + rng.normal(scale=0.5, size=12)
    assert pearson(list(x), list(y)) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # Spearman = Pearson on ranks; a monotone but non-linear relation gives exactly 1.
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties share their mean rank: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4].
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


def test_correlation_undefined_cases_are_none():
    assert pearson([1, 2], [3, 4]) is None  # too few points
    assert pearson([1, 1, 1], [1, 2, 3]) is None  # constant side
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def test_pick_best_prefers_finished_trials_and_lowest_loss():
    rows = [
        row(4, 3.2),
        row(8, 3.0),
        row(12, 2.5, status="stopped", steps=5),  # lower, but measured after fewer steps
        row(16, None, status="failed", error="boom"),
    ]
    assert pick_best(rows).k == 8
    # When nothing finished, early-stopped trials count.
    only_stopped = [row(4, 3.1, status="stopped"), row(8, 2.9, status="stopped")]
    assert pick_best(only_stopped).k == 8
    assert pick_best([row(4, None, status="failed")]) is None
    # Ties go to the smaller k.
    assert pick_best([row(8, 3.0), row(4, 3.0)]).k == 4


def test_silhouette_agreement_reports_sign_and_argmax():
    # Silhouette falls as loss rises: the cheap criterion works (negative correlation, agreement).
    rows = [row(4, 2.0, sil=0.30), row(8, 2.5, sil=0.20), row(12, 3.0, sil=0.10)]
    (g,) = silhouette_agreement(rows)
    assert g["pearson"] == pytest.approx(-1.0)
    assert g["spearman"] == pytest.approx(-1.0)
    assert g["k_best_silhouette"] == 4 and g["k_best_loss"] == 4 and g["agrees"]
    # Opposite: silhouette rises with loss.
    bad = [row(4, 2.0, sil=0.10), row(8, 2.5, sil=0.20), row(12, 3.0, sil=0.30)]
    (g,) = silhouette_agreement(bad)
    assert g["pearson"] == pytest.approx(1.0) and not g["agrees"]
    assert g["k_best_silhouette"] == 12


def test_silhouette_agreement_compares_losses_at_a_common_step():
    # k=4 ran 40 steps (loss fell to 2.0), k=8 and k=12 were stopped at 20: compare everyone at step 20.
    rows = [row(4, 2.0, sil=0.10, losses={10: 3.5, 20: 3.0, 30: 2.5, 40: 2.0}),
            row(8, 2.8, sil=0.20, status="stopped", steps=20, losses={10: 3.3, 20: 2.8}),
            row(12, 2.9, sil=0.30, status="stopped", steps=20, losses={10: 3.2, 20: 2.9})]
    (g,) = silhouette_agreement(rows)
    assert g["at_step"] == 20
    assert g["k_best_loss"] == 8  # at step 20, not k=4's later 2.0
    assert g["spearman"] == pytest.approx(-0.5)  # losses at step 20: 3.0, 2.8, 2.9


def test_silhouette_agreement_groups_by_lam_and_strategy_and_skips_failed():
    rows = [row(k, 2 + k / 10, sil=1 / k, strategy=s) for k in (4, 8, 12) for s in ("stratified", "rnb")]
    rows.append(row(16, None, sil=0.5, status="failed"))
    groups = silhouette_agreement(rows)
    assert [(g["strategy"], g["n"]) for g in groups] == [("rnb", 3), ("stratified", 3)]


def test_table_and_csv_have_every_trial_and_mark_the_best():
    rows = sort_rows([row(8, 3.0, sil=0.1, inertia=12.5, smallest_domain=3, largest_domain=90, seconds=4.2),
                      row(4, 2.9), row(12, None, status="failed", error="RuntimeError: injected")])
    best = pick_best(rows)
    text = format_table(rows, best)
    lines = text.splitlines()
    assert lines[1].startswith("*") and " 4 " in lines[1]  # sorted by k, best marked
    assert "FAILED" in text and "RuntimeError: injected" in text
    parsed = list(csv.reader(io.StringIO("\n".join(",".join(r) for r in csv_rows(rows)))))
    assert parsed[0] == list(COLUMNS)
    assert [r[1] for r in parsed[1:]] == ["4", "8", "12"]
    assert parsed[2][COLUMNS.index("silhouette")] == "0.1"
    assert parsed[3][COLUMNS.index("eval_loss")] == ""
