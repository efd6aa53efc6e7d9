"""R&B as a strategy, the simple strategies and the registry (pure numpy, milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from rnb_ray.balance.gram import gram, rnb_mixture
from rnb_ray.balance.strategies import STRATEGIES, RoundStats, known_strategies
from rnb_ray.balance.strategies.rnb import RnB
from rnb_ray.balance.strategies.simple import Static, check_weights

GRADS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_strategy_replaces_p_each_round():
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3), lam=3.0)
    p1, _ = s.update(s.initial(), RoundStats.from_vectors(0, np.ones(3), grads=GRADS))
    other = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p2, _ = s.update(p1, RoundStats.from_vectors(1, np.ones(3), grads=other))
    fresh, _ = rnb_mixture(gram(other), np.full(3, 1 / 3), 3.0)
    np.testing.assert_allclose(p2, fresh)  # nothing carried over from round 0


def test_absent_domain_keeps_its_last_estimate():
    """The estimates live with the gradients (workers); G over them reaches the strategy."""
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    first = RoundStats.from_vectors(0, np.ones(3), grads=GRADS)
    s.update(s.initial(), first)
    new = np.array([[np.nan, np.nan], [2.0, 0.0], [0.0, 3.0]])
    p, reason = s.update(np.full(3, 1 / 3), RoundStats.from_vectors(1, np.array([0, 4, 4]), grads=new,
                                                                       previous=first.extra["est"]))
    assert reason is None
    expected, _ = rnb_mixture(gram(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])), np.full(3, 1 / 3), 3.0)
    np.testing.assert_allclose(p, expected)


def test_non_finite_contribution_skips_the_round():
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    p0 = np.array([0.2, 0.3, 0.5])
    bad = GRADS.copy()
    bad[1, 0] = np.inf
    p, reason = s.update(p0, RoundStats.from_vectors(0, np.ones(3), grads=bad))
    assert reason is not None and "non-finite" in reason
    np.testing.assert_array_equal(p, p0)


def test_zero_gq_skips_the_round():
    # The evaluated domain's gradient is orthogonal to everything (here: zero) -> Gq = 0.
    grads = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    s = RnB(3, sizes=np.ones(3), q=np.array([0.0, 0.0, 1.0]))
    p0 = np.full(3, 1 / 3)
    p, reason = s.update(p0, RoundStats.from_vectors(0, np.ones(3), grads=grads))
    assert reason is not None and "‖Gq‖" in reason
    np.testing.assert_array_equal(p, p0)


def test_state_round_trip():
    s = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    s.update(s.initial(), RoundStats.from_vectors(0, np.ones(3), grads=GRADS))
    t = RnB(3, sizes=np.ones(3), q=np.full(3, 1 / 3))
    t.load_state_dict(s.state_dict())
    stats = RoundStats.from_vectors(1, np.array([0, 1, 1]), grads=np.array([[np.nan, np.nan], [1.0, 2.0], [3.0, 0.0]]),
                                    previous=GRADS)
    np.testing.assert_allclose(s.update(np.full(3, 1 / 3), stats)[0], t.update(np.full(3, 1 / 3), stats)[0])


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
