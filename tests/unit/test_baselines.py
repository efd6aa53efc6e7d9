"""Each baseline's update on a small hand-made case, checked against its paper's formula written out here.

The expected values are computed independently with plain arithmetic (math.exp, explicit sums), not by
calling the strategies' helpers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rnb_ray.balance.strategies import STRATEGIES, RoundStats
from rnb_ray.balance.strategies.aioli import Aioli, perturbed_mixture
from rnb_ray.balance.strategies.dga import DGA
from rnb_ray.balance.strategies.doge import DoGE
from rnb_ray.balance.strategies.skillit import SkillIt, gradient_graph
from rnb_ray.errors import RnbError

SIZES = np.array([10.0, 20.0, 30.0])
Q3 = np.array([1 / 3, 1 / 3, 1 / 3])

# three domains, 2-d gradients
GRADS = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
EVAL_GRAD = np.array([2.0, 1.0])
# alignments <g_i, g_eval> = [2, 2, -1]


def normalized(xs):
    s = sum(xs)
    return [x / s for x in xs]


def test_all_four_registered():
    assert {"dga", "doge", "skillit", "aioli"} <= set(STRATEGIES)


# ---------------------------------------------------------------- DoGE
def test_doge_raw_is_multiplicative_weights_on_alignment():
    s = DoGE(3, sizes=SIZES, q=Q3, eta=0.1, scale="raw")
    p0 = np.array([0.5, 0.3, 0.2])
    p1, reason = s.update(p0, RoundStats.from_vectors(0, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD))
    assert reason is None
    want = normalized([0.5 * math.exp(0.1 * 2), 0.3 * math.exp(0.1 * 2), 0.2 * math.exp(0.1 * -1)])
    np.testing.assert_allclose(p1, want, rtol=1e-12)
    # accumulation: a second identical round multiplies again
    p2, _ = s.update(p1, RoundStats.from_vectors(1, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD))
    want2 = normalized([0.5 * math.exp(0.4), 0.3 * math.exp(0.4), 0.2 * math.exp(-0.2)])
    np.testing.assert_allclose(p2, want2, rtol=1e-12)
    np.testing.assert_allclose(s.state_dict()["average"], (p1 + p2) / 2)


def test_doge_max_scale_divides_by_largest_alignment():
    s = DoGE(3, sizes=SIZES, q=Q3, eta=1.0)  # scale='max': W = [2,2,-1]/2
    p1, _ = s.update(np.full(3, 1 / 3), RoundStats.from_vectors(0, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD))
    np.testing.assert_allclose(p1, normalized([math.exp(1), math.exp(1), math.exp(-0.5)]), rtol=1e-12)


def test_doge_universal_target_uses_sum_of_training_gradients_and_no_eval_pass():
    s = DoGE(3, sizes=SIZES, q=Q3, eta=0.1, scale="raw", target="train")
    assert s.needs_eval_grad is False and DoGE.needs_eval_grad is True
    # target = g1+g2+g3 = [0, 3]; W = [0, 6, 3]
    p1, _ = s.update(np.full(3, 1 / 3), RoundStats.from_vectors(0, np.ones(3), grads=GRADS))
    np.testing.assert_allclose(p1, normalized([1.0, math.exp(0.6), math.exp(0.3)]), rtol=1e-12)


def test_doge_absent_domain_gets_no_score_and_missing_eval_grad_skips():
    s = DoGE(3, sizes=SIZES, q=Q3, eta=0.1, scale="raw")
    grads = GRADS.copy()
    grads[2] = np.nan
    p1, _ = s.update(np.full(3, 1 / 3), RoundStats.from_vectors(0, np.array([1, 1, 0]), grads=grads, eval_grad=EVAL_GRAD))
    np.testing.assert_allclose(p1, normalized([math.exp(0.2), math.exp(0.2), 1.0]), rtol=1e-12)
    p = np.array([0.2, 0.3, 0.5])
    same, reason = s.update(p, RoundStats.from_vectors(1, np.ones(3), grads=GRADS, eval_grad=None))
    assert reason and "evaluation gradient" in reason
    np.testing.assert_array_equal(same, p)


# ---------------------------------------------------------------- DGA
def test_dga_exponentiated_step_then_ema():
    s = DGA(3, sizes=SIZES, q=Q3, eta=0.5, ema=0.25, scale="raw")
    np.testing.assert_allclose(s.initial(), [1 / 3] * 3)
    p1, reason = s.update(s.initial(), RoundStats.from_vectors(0, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD))
    assert reason is None
    hat = normalized([math.exp(0.5 * 2), math.exp(0.5 * 2), math.exp(0.5 * -1)])
    want = [0.25 * (1 / 3) + 0.75 * h for h in hat]
    np.testing.assert_allclose(p1, want, rtol=1e-12)
    assert abs(sum(p1) - 1) < 1e-12
    # the second step starts from the smoothed weights
    p2, _ = s.update(p1, RoundStats.from_vectors(1, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD))
    hat2 = normalized([want[0] * math.exp(1.0), want[1] * math.exp(1.0), want[2] * math.exp(-0.5)])
    np.testing.assert_allclose(p2, [0.25 * w + 0.75 * h for w, h in zip(want, hat2, strict=True)], rtol=1e-12)


def test_dga_distribution_reweighting_over_basis():
    basis = [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    s = DGA(3, sizes=SIZES, q=Q3, eta=1.0, ema=0.0, scale="raw", basis=basis)
    np.testing.assert_allclose(s.initial(), [0.25, 0.25, 0.5])
    # basis gradients: b1 -> 0.5 g1 + 0.5 g2 = [0.5, 1]; <.,[2,1]> = 2. b2 -> g3: <[-1,1],[2,1]> = -1
    p1, _ = s.update(s.initial(), RoundStats.from_vectors(0, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD))
    a = normalized([0.5 * math.exp(2.0), 0.5 * math.exp(-1.0)])
    np.testing.assert_allclose(p1, [a[0] * 0.5, a[0] * 0.5, a[1]], rtol=1e-12)


def test_dga_state_round_trips_through_json():
    s = DGA(3, sizes=SIZES, q=Q3, eta=0.5)
    s.update(s.initial(), RoundStats.from_vectors(0, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD))
    t = DGA(3, sizes=SIZES, q=Q3, eta=0.5)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    st = RoundStats.from_vectors(1, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD)
    np.testing.assert_array_equal(s.update(s.initial(), st)[0], t.update(t.initial(), st)[0])


# ---------------------------------------------------------------- Skill-It
def test_skillit_given_graph_window_formula():
    graph = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 1.0]]
    s = SkillIt(3, sizes=SIZES, q=Q3, eta=0.1, window=2, graph=graph)
    assert s.needs_train_grads is False
    # p^1_i ∝ exp(η Σ_j A_ij)
    np.testing.assert_allclose(s.initial(), normalized([math.exp(0.15), math.exp(0.1), math.exp(0.12)]))
    l1, l2, l3 = [3.0, 2.0, 1.0], [2.0, 2.0, 1.0], [1.0, 1.5, 0.5]
    s.update(s.initial(), RoundStats(0, np.ones(3), eval_losses=np.array(l1)))
    s.update(s.initial(), RoundStats(1, np.ones(3), eval_losses=np.array(l2)))
    p, reason = s.update(s.initial(), RoundStats(2, np.ones(3), eval_losses=np.array(l3)))
    assert reason is None
    window = [l2[j] + l3[j] for j in range(3)]  # the last w=2 rounds only
    want = normalized([math.exp(0.1 * sum(graph[i][j] * window[j] for j in range(3))) for i in range(3)])
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_skillit_gradient_graph_from_training_gradients():
    s = SkillIt(3, sizes=SIZES, q=Q3, eta=1.0, window=1)
    assert s.needs_train_grads is True
    # Gram of GRADS: [[1,0,-1],[0,4,2],[-1,2,2]]; clip negatives, rows normalised to sum 1
    graph = [[1.0, 0, 0], [0, 4 / 6, 2 / 6], [0, 0.5, 0.5]]
    losses = [1.0, 2.0, 4.0]
    p, _ = s.update(np.full(3, 1 / 3), RoundStats.from_vectors(0, np.ones(3), grads=GRADS, eval_losses=np.array(losses)))
    want = normalized([math.exp(sum(graph[i][j] * losses[j] for j in range(3))) for i in range(3)])
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_skillit_weights_eval_domains_by_q_and_skips_without_losses():
    q = np.array([0.5, 0.25, 0.25])
    s = SkillIt(3, sizes=SIZES, q=q, eta=1.0, window=1, graph="identity")
    p, _ = s.update(np.full(3, 1 / 3), RoundStats(0, np.ones(3), eval_losses=np.array([1.0, 1.0, 1.0])))
    np.testing.assert_allclose(p, normalized([math.exp(1.5), math.exp(0.75), math.exp(0.75)]), rtol=1e-12)
    same, reason = s.update(p, RoundStats(1, np.ones(3)))
    assert reason and "evaluation losses" in reason
    np.testing.assert_array_equal(same, p)


# ---------------------------------------------------------------- Aioli
def test_aioli_learnparams_recovers_a_known_linear_mixing_law():
    """Losses generated by a true law L_after = L_before - A_true p: Aioli must find A_true, then step."""
    a_true = np.array([[0.30, 0.05, 0.00], [0.10, 0.20, 0.00], [0.00, 0.10, 0.40]])
    s = Aioli(3, sizes=SIZES, q=Q3, eta=0.5, one_hot_factor=0.6, normalize=False, exploit_rounds=1)
    losses = np.array([5.0, 5.0, 5.0])
    p = s.initial()
    seen = []
    for r in range(1 + 3):  # round 0 (uniform) then m=3 learning rounds
        losses = losses - a_true @ p
        p, reason = s.update(p, RoundStats(r, np.ones(3), eval_losses=losses.copy()))
        assert reason is None
        seen.append(p.copy())
    # the learning rounds used the smoothed one-hot mixtures, each group once
    learned = sorted(tuple(np.round(x, 9)) for x in seen[:3])
    expected = sorted(tuple(np.round(perturbed_mixture(3, j, 0.6), 9)) for j in range(3))
    assert learned == expected
    np.testing.assert_allclose(perturbed_mixture(3, 1, 0.6), [0.2, 0.6, 0.2])
    np.testing.assert_allclose(s.A, a_true, atol=1e-10)
    # p_j ∝ p0_j · exp(η Σ_i A_ij) with column sums [0.4, 0.35, 0.4]
    want = normalized([math.exp(0.5 * 0.40), math.exp(0.5 * 0.35), math.exp(0.5 * 0.40)])
    np.testing.assert_allclose(seen[3], want, rtol=1e-9)
    assert s.phase == "exploit"


def test_aioli_normalizes_a_and_applies_ema_across_cycles():
    a_true = np.array([[0.2, 0.0], [0.0, 0.4]])
    s = Aioli(2, sizes=SIZES[:2], q=np.array([0.5, 0.5]), eta=1.0, one_hot_factor=0.75, ema=0.5)
    losses = np.array([3.0, 3.0])
    p = s.initial()
    for r in range(3):
        losses = losses - a_true @ p
        p, _ = s.update(p, RoundStats(r, np.ones(2), eval_losses=losses.copy()))
    np.testing.assert_allclose(s.A, [[0.5, 0.0], [0.0, 1.0]], atol=1e-10)  # divided by max 0.4
    np.testing.assert_allclose(p, normalized([math.exp(0.5), math.exp(1.0)]), rtol=1e-9)
    # second cycle with a different law: A = 0.5·A_prev + 0.5·A_new(normalised)
    a2 = np.array([[0.4, 0.0], [0.0, 0.4]])
    for r in range(3, 6):
        losses = losses - a2 @ p
        p, _ = s.update(p, RoundStats(r, np.ones(2), eval_losses=losses.copy()))
    np.testing.assert_allclose(s.A, 0.5 * np.array([[0.5, 0], [0, 1.0]]) + 0.5 * np.eye(2), atol=1e-10)


def test_aioli_state_resumes_mid_cycle_and_asks_for_short_learning_rounds():
    s = Aioli(3, sizes=SIZES, q=Q3, learn_steps=4, sweeps=2, seed=7)
    assert s.next_round_steps() is None  # round 0 is an ordinary round
    p = s.initial()
    losses = np.array([4.0, 4.0, 4.0])
    for r in range(3):
        losses = losses - 0.1
        p, _ = s.update(p, RoundStats(r, np.ones(3), eval_losses=losses.copy()))
    assert s.next_round_steps() == 4
    t = Aioli(3, sizes=SIZES, q=Q3, learn_steps=4, sweeps=2, seed=7)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for r in range(3, 7):  # learning rounds 1..6 (m·sweeps = 6) end after round 6
        losses = losses - np.array([0.1, 0.2, 0.05])
        st = RoundStats(r, np.ones(3), eval_losses=losses.copy())
        ps, _ = s.update(p, st)
        pt, _ = t.update(p, st)
        np.testing.assert_array_equal(ps, pt)
        p = ps
    assert s.cycle == 1 and s.phase == "exploit"


def test_aioli_missing_losses_restart_the_learning_phase():
    s = Aioli(3, sizes=SIZES, q=Q3)
    p, _ = s.update(s.initial(), RoundStats(0, np.ones(3), eval_losses=np.array([2.0, 2.0, 2.0])))
    p, _ = s.update(p, RoundStats(1, np.ones(3), eval_losses=np.array([1.9, 1.8, 1.7])))
    p, reason = s.update(p, RoundStats(2, np.ones(3), eval_losses=np.full(3, np.nan)))
    assert reason and "no finite evaluation loss" in reason
    np.testing.assert_allclose(p, s.base)
    assert s.phase == "exploit" and s.mixtures == []


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("cls", "options", "text"),
    [
        (DoGE, {"eta": "fast"}, "eta"),
        (DoGE, {"target": "ood"}, "target"),
        (DGA, {"ema": 1.0}, "ema"),
        (DGA, {"basis": [[1.0, 0.0]]}, "basis"),
        (SkillIt, {"window": 0}, "window"),
        (SkillIt, {"graph": [[1, 0], [0, 1]]}, "graph"),
        (Aioli, {"one_hot_factor": 1 / 3}, "one_hot_factor"),
        (Aioli, {"lr": 0.1}, "unknown"),
    ],
)
def test_bad_options_raise_rnberror_naming_them(cls, options, text):
    with pytest.raises(RnbError, match=text):
        cls(3, sizes=SIZES, q=Q3, **options)


def test_every_state_dict_is_json(tmp_path):
    for cls in (DGA, DoGE, SkillIt, Aioli):
        s = cls(3, sizes=SIZES, q=Q3)
        st = RoundStats.from_vectors(0, np.ones(3), grads=GRADS, eval_grad=EVAL_GRAD, eval_losses=np.array([3.0, 2.0, 1.0]))
        s.update(s.initial(), st)
        json.dumps(s.state_dict(), allow_nan=False)


def test_domains_without_evaluation_examples_do_not_block_updates():
    """A NaN evaluation loss (a domain with no evaluation examples, q_i = 0) is ignored, not a skip."""
    q = np.array([0.5, 0.5, 0.0])
    sk = SkillIt(3, sizes=SIZES, q=q, eta=1.0, window=1, graph="identity")
    p, reason = sk.update(np.full(3, 1 / 3), RoundStats(0, np.ones(3), eval_losses=np.array([1.0, 2.0, np.nan])))
    assert reason is None
    np.testing.assert_allclose(p, normalized([math.exp(1.5), math.exp(3.0), 1.0]), rtol=1e-12)  # m·q = 1.5

    a_true = np.array([[0.3, 0.1, 0.2], [0.0, 0.2, 0.1], [0.0, 0.0, 0.0]])
    s = Aioli(3, sizes=SIZES, q=q, eta=1.0, normalize=False)
    losses = np.array([4.0, 4.0, np.nan])
    p = s.initial()
    for r in range(4):
        losses = losses - a_true @ p
        p, reason = s.update(p, RoundStats(r, np.ones(3), eval_losses=losses.copy()))
        assert reason is None
        json.dumps(s.state_dict(), allow_nan=False)
    np.testing.assert_allclose(s.A[:2], a_true[:2], atol=1e-10)
    np.testing.assert_allclose(s.A[2], 0.0, atol=1e-10)
    # objective weights m·q = [1.5, 1.5, 0]: p_j ∝ exp(1.5·(A_0j + A_1j))
    want = normalized([math.exp(1.5 * 0.3), math.exp(1.5 * 0.3), math.exp(1.5 * 0.3)])
    np.testing.assert_allclose(p, want, rtol=1e-9)


def test_skillit_gradient_graph_keeps_absent_domains_previous_edges():
    first = gradient_graph(GRADS @ GRADS.T, np.ones(3, dtype=bool), np.eye(3))
    grads = GRADS.copy()
    grads[0] = 99.0  # domain 0 absent: its row/column keep the first round's values
    grads[2] = [0.0, 1.0]
    second = gradient_graph(grads @ grads.T, np.array([False, True, True]), first)
    np.testing.assert_allclose(second[0], first[0])
    np.testing.assert_allclose(second[:, 0], first[:, 0])
    # domains 1, 2 now: Gram [[4, 2], [2, 1]] -> rows [4/6, 2/6], [2/3, 1/3]
    np.testing.assert_allclose(second[np.ix_([1, 2], [1, 2])], [[4 / 6, 2 / 6], [2 / 3, 1 / 3]])
