"""The R&B update rule: domain means, the Gram matrix, p from G, the floor (pure numpy, milliseconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnb_ray.balance.gram import apply_floor, domain_means, gram, rnb_mixture, softmax

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
