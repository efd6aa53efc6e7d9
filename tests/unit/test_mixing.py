"""The R&B update rule and the simple strategies (pure numpy, milliseconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnb_ray.balance.mixing import (
    RnB,
    Static,
    apply_floor,
    check_weights,
    domain_means,
    gram,
    known_strategies,
    rnb_mixture,
    softmax,
)
from rnb_ray.balance.strategy import STRATEGIES, RoundStats

GRADS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_gram_by_hand():
    assert gram(GRADS).tolist() == [[1, 0, 1], [0, 1, 1], [1, 1, 2]]


def test_update_rule_on_hand_computed_gram():
    # G q = [2, 2, 4]/3, ‖Gq‖ = √24/3 -> λ·Gq/‖Gq‖ = 3·[2, 2, 4]/√24.
    p, reason = rnb_mixture(gram(GRADS), np.full(3, 1 / 3), lam=3.0)
    assert reason is None
    z = 3 * np.array([2, 2, 4]) / math.sqrt(24)
    expected = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(p, [0.185072, 0.185072, 0.629856], atol=1e-6)


def test_q_weights_the_evaluation_domains():
    # Only domain 1 is evaluated: Gq = column 1 = [0, 1, 1] -> domains 1 and 2 equally favoured over 0.
    p, _ = rnb_mixture(gram(GRADS), np.array([0.0, 1.0, 0.0]), lam=3.0)
    assert p[1] == pytest.approx(p[2])
    assert p[1] > p[0]


def test_larger_lambda_is_more_peaked():
    G, q = gram(GRADS), np.full(3, 1 / 3)
    entropies = [-(p * np.log(p)).sum() for p in (rnb_mixture(G, q, lam)[0] for lam in (0.5, 3, 10))]
    assert entropies[0] > entropies[1] > entropies[2]


def test_strategy_replaces_p_each_round():
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3), lam=3.0)
    p1, _ = s.update(s.initial(), RoundStats(0, counts=np.ones(3), grads=GRADS))
    other = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p2, _ = s.update(p1, RoundStats(1, counts=np.ones(3), grads=other))
    fresh, _ = rnb_mixture(gram(other), np.full(3, 1 / 3), 3.0)
    np.testing.assert_allclose(p2, fresh)  # nothing carried over from round 0


def test_absent_domain_keeps_its_last_estimate():
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    s.update(s.initial(), RoundStats(0, counts=np.ones(3), grads=GRADS))
    new = np.array([[np.nan, np.nan], [2.0, 0.0], [0.0, 3.0]])
    p, reason = s.update(np.full(3, 1 / 3), RoundStats(1, counts=np.array([0, 4, 4]), grads=new))
    assert reason is None
    expected, _ = rnb_mixture(gram(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])), np.full(3, 1 / 3), 3.0)
    np.testing.assert_allclose(p, expected)


def test_non_finite_contribution_skips_the_round():
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    p0 = np.array([0.2, 0.3, 0.5])
    bad = GRADS.copy()
    bad[1, 0] = np.inf
    p, reason = s.update(p0, RoundStats(0, counts=np.ones(3), grads=bad))
    assert reason is not None and "non-finite" in reason
    np.testing.assert_array_equal(p, p0)


def test_zero_gq_skips_the_round():
    # The evaluated domain's gradient is orthogonal to everything (here: zero) -> Gq = 0.
    grads = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    s = RnB(3, sizes=np.ones(3), q=np.array([0.0, 0.0, 1.0]))
    p0 = np.full(3, 1 / 3)
    p, reason = s.update(p0, RoundStats(0, counts=np.ones(3), grads=grads))
    assert reason is not None and "‖Gq‖" in reason
    np.testing.assert_array_equal(p, p0)


def test_state_round_trip():
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    s.update(s.initial(), RoundStats(0, counts=np.ones(3), grads=GRADS))
    t = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    t.load_state_dict(s.state_dict())
    stats = RoundStats(1, counts=np.array([0, 1, 1]), grads=np.array([[np.nan, np.nan], [1.0, 2.0], [3.0, 0.0]]))
    np.testing.assert_allclose(s.update(np.full(3, 1 / 3), stats)[0], t.update(np.full(3, 1 / 3), stats)[0])


def test_domain_means_marks_empty_domains_nan():
    means = domain_means(np.array([[2.0, 4.0], [0.0, 0.0]]), np.array([2, 0]))
    assert means[0].tolist() == [1.0, 2.0]
    assert np.isnan(means[1]).all()


def test_softmax_is_stable():
    assert softmax(np.array([1000.0, 1000.0])).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("floor", [0.05, 0.2, 0.24])
def test_floor_projection(floor):
    p = apply_floor(np.array([0.9, 0.07, 0.02, 0.01]), floor)
    assert p.sum() == pytest.approx(1.0)
    assert p.min() >= floor - 1e-12
    np.testing.assert_allclose(apply_floor(p, floor), p)  # idempotent
    assert p[0] == p.max()


def test_floor_too_large():
    with pytest.raises(ValueError, match="too large"):
        apply_floor(np.full(4, 0.25), 0.25)


def test_simple_strategies():
    sizes = np.array([10.0, 30.0, 60.0])
    q = np.full(3, 1 / 3)
    assert STRATEGIES["stratified"](3, sizes=sizes, q=q).initial().tolist() == pytest.approx([1 / 3] * 3)
    assert STRATEGIES["natural"](3, sizes=sizes, q=q).initial().tolist() == pytest.approx([0.1, 0.3, 0.6])
    assert Static(3, sizes=sizes, q=q, weights=[0.5, 0.25, 0.25]).initial().tolist() == [0.5, 0.25, 0.25]
    strat = STRATEGIES["stratified"](3, sizes=sizes, q=q)
    assert strat.update(np.full(3, 1 / 3), RoundStats(0, counts=np.ones(3)))[0].tolist() == pytest.approx([1 / 3] * 3)
    assert not strat.needs_train_grads and STRATEGIES["rnb"].needs_train_grads


def test_registry_has_the_issue_strategies():
    assert {"rnb", "stratified", "natural", "static"} <= set(known_strategies())


@pytest.mark.parametrize(
    ("weights", "message"),
    [([0.5, 0.6, -0.1], "non-negative"), ([0.5, 0.3, 0.1], "sum to 1"), ([0.5, 0.5], "expected 3"),
     ([np.nan, 0.5, 0.5], "finite")],
)
def test_bad_static_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        check_weights(weights, 3)


def test_bad_options():
    with pytest.raises(ValueError, match="lam"):
        RnB(3, sizes=np.ones(3), q=np.ones(3) / 3, lam=0.0)
    with pytest.raises(ValueError, match="unknown"):
        RnB(3, sizes=np.ones(3), q=np.ones(3) / 3, eta=1.0)
