"""The round's terms formed on column shards (workers) equal the old mixer-side computation on full vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnb_ray.balance.gram import domain_means, expected_sketch_error, gram, gram_terms_dense
from rnb_ray.balance.gram_terms import DomainEstimates, add_row_products, column_runs, nonfinite_rows
from rnb_ray.balance.sketch import AUTO_MAX_BUCKETS, AUTO_MAX_SKETCH, choose_capture, effective_dims


def _sharded_round(shards: list[DomainEstimates], sums: np.ndarray, counts: np.ndarray,
                   eval_grad: np.ndarray | None):
    """What RoundReducer does with W workers: column shards, partial terms, their sum (the all-reduce)."""
    cols = np.array_split(np.arange(sums.shape[1]), len(shards))
    c = torch.as_tensor(counts)
    bad = sum(nonfinite_rows(torch.as_tensor(sums[:, ix], dtype=torch.float32)) for ix in cols)
    ok = bad == 0
    blocks, evals = [], []
    for est, ix in zip(shards, cols, strict=True):
        rows, block = est.update_rows(torch.as_tensor(sums[:, ix], dtype=torch.float32), c, ok)
        blocks.append(block)
        if eval_grad is not None:
            evals.append(est.eval_partials(torch.as_tensor(eval_grad[ix], dtype=torch.float32)))
    total = sum(blocks)
    for est in shards:
        est.set_rows(rows, total)
    return shards[0].gram.numpy(), (sum(evals).numpy() if evals else None), (c > 0) & ok


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_sharded_terms_equal_the_mixer_side_computation_over_rounds(workers):
    rng = np.random.default_rng(0)
    m, D = 5, 37  # D not a multiple of the worker count
    shards = [DomainEstimates(m, len(ix)) for ix in np.array_split(np.arange(D), workers)]
    previous = None
    for r, present in enumerate([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0], [1, 0, 0, 0, 1]]):
        counts = np.array(present) * rng.integers(1, 5, size=m)
        sums = rng.normal(size=(m, D)) * counts[:, None]
        eval_grad = rng.normal(size=D)
        G, ev, ok = _sharded_round(shards, sums, counts, eval_grad)
        ref = gram_terms_dense(domain_means(sums, counts), previous, eval_grad)  # the old path, float64
        previous = ref["est"]
        np.testing.assert_allclose(G, ref["gram"], rtol=1e-5, atol=1e-6, err_msg=f"round {r}")
        np.testing.assert_allclose(ev[:m], ref["eval_align"], rtol=1e-5, atol=1e-6)
        assert ev[m] == pytest.approx(ref["eval_sq"], rel=1e-5)
        assert ok.numpy().tolist() == (counts > 0).tolist()
    np.testing.assert_allclose(gram(previous), G, rtol=1e-5, atol=1e-6)


def test_a_non_finite_domain_keeps_its_estimate_and_is_reported():
    m, D = 3, 6
    est = [DomainEstimates(m, 3), DomainEstimates(m, 3)]
    sums = np.ones((m, D))
    _sharded_round(est, sums, np.ones(m, dtype=np.int64), None)
    bad = sums * 2
    bad[1, 4] = np.inf  # only on the second worker's columns: both must keep domain 1's old estimate
    G, _, ok = _sharded_round(est, bad, np.ones(m, dtype=np.int64), None)
    assert ok.tolist() == [True, False, True]
    assert torch.equal(est[0].est[1], torch.ones(3)) and torch.equal(est[1].est[1], torch.ones(3))
    assert G[0, 0] == pytest.approx(4 * D) and G[1, 1] == pytest.approx(D) and np.isfinite(G).all()


def test_estimates_state_round_trip():
    a = DomainEstimates(2, 4)
    a.update_rows(torch.arange(8.0).view(2, 4), torch.tensor([1, 2]), torch.tensor([True, True]))
    b = DomainEstimates(2, 4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.est, b.est) and torch.equal(a.seen, b.seen)
    with pytest.raises(ValueError, match="shape"):
        DomainEstimates(2, 5).load_state_dict(a.state_dict())


def test_capture_choice_from_the_budget():
    head = [(30522, 768)]
    small = choose_capture([(259, 32)], m=4, world=2, budget_bytes=2**30)
    assert small.sketch_dim == 0 and small.numbers_per_domain == 259 * 32
    # GPT-2 small's head at 15 domains: 2.8 GB exact on one worker; the default 512 MB budget takes the row hash.
    gpt2 = choose_capture(head, m=15, world=1, budget_bytes=512 * 2**20)
    assert gpt2.kind == "rowhash" and gpt2.sketch_dim == AUTO_MAX_BUCKETS
    assert gpt2.numbers_per_domain == AUTO_MAX_BUCKETS * 768 and gpt2.bytes_per_worker <= 512 * 2**20
    big = choose_capture(head, m=256, world=1, budget_bytes=512 * 2**20)
    assert 0 < big.sketch_dim < AUTO_MAX_BUCKETS and big.bytes_per_worker <= 512 * 2**20
    gauss = choose_capture(head, m=64, world=1, budget_bytes=2**30, kind="gaussian")  # 64 × 23.4 M floats: 12 GB
    assert gauss.sketch_dim == AUTO_MAX_SKETCH and gauss.bytes_per_worker <= 2**30
    tight = choose_capture(head, m=1000, world=8, budget_bytes=8 * 2**20, kind="gaussian")
    assert 0 < tight.sketch_dim < AUTO_MAX_SKETCH and tight.bytes_per_worker <= 8 * 2**20
    assert choose_capture(head, m=64, world=1, budget_bytes=2**30, requested=0).sketch_dim == 0
    assert choose_capture([(259, 32)], m=4, world=1, budget_bytes=2**30, requested=64, kind="gaussian"
                          ).numbers_per_domain == 64
    assert choose_capture([(259, 32)], m=4, world=1, budget_bytes=2**30, requested=64).numbers_per_domain == 64 * 32
    # With several workers the round's collective buffer (≤ m rows, kept across rounds) counts too: 4·m·D·(2 + 1/W).
    one = choose_capture(head, m=64, world=1, budget_bytes=450 * 2**20)  # 1,024 buckets: 384 MB on one worker
    two = choose_capture(head, m=64, world=2, budget_bytes=450 * 2**20)  # 480 MB on each of two: 512 buckets
    assert one.sketch_dim == AUTO_MAX_BUCKETS and one.bytes_per_worker == 4 * 64 * AUTO_MAX_BUCKETS * 768 * 2
    assert two.sketch_dim == AUTO_MAX_BUCKETS // 2 and two.bytes_per_worker == int(4 * 64 * 512 * 768 * 2.5)
    # A slotted capture holds only the rows a round fills (S = batch × update_every): at 1,000 domains on 8 workers
    # the sums (1,000 rows), the collective's buffer (1,000) and the estimates' share (125) forced the 64-bucket
    # floor; with S = 40 the buffer is min(m, W·S) = 320 rows and 256 buckets fit.
    wide = choose_capture(head, m=1000, world=8, budget_bytes=512 * 2**20)
    slotted = choose_capture(head, m=1000, world=8, budget_bytes=512 * 2**20, slots=40)
    assert wide.sketch_dim == 64 and slotted.sketch_dim == 256 and slotted.as_dict()["sum_rows"] == 40
    assert slotted.bytes_per_worker == 4 * 256 * 768 * (40 + 125 + 320) <= 512 * 2**20
    assert choose_capture(head, m=64, world=2, budget_bytes=450 * 2**20, slots=10**6).bytes_per_worker == \
        two.bytes_per_worker  # slots beyond m: as many rows as domains
    assert gpt2.as_dict()["mode"] == "sketch" and gpt2.as_dict()["kind"] == "rowhash"
    assert small.as_dict()["mode"] == "exact"
    with pytest.raises(ValueError, match="unknown sketch kind"):
        choose_capture(head, m=4, world=1, budget_bytes=1, kind="fourier")


def test_expected_sketch_error_shrinks_with_the_sketch():
    G = np.array([[2.0, 1.0], [1.0, 2.0]])
    e_small = expected_sketch_error(G, effective_dims([(1000, 64)], "gaussian", 256))
    e_big = expected_sketch_error(G, effective_dims([(1000, 64)], "gaussian", 4096))
    assert e_small is not None and e_big is not None and e_big < e_small < 1
    h_small = expected_sketch_error(G, effective_dims([(1000, 64)], "rowhash", 64))
    h_big = expected_sketch_error(G, effective_dims([(1000, 64)], "rowhash", 512))
    assert h_small is not None and h_big is not None and h_big < h_small < 1
    assert expected_sketch_error(G, effective_dims([(100, 64)], "rowhash", 512)) == 0.0  # kept exact
    assert expected_sketch_error(np.zeros((2, 2)), [64.0]) is None


@pytest.mark.parametrize("pattern", ["0000001111", "0011101001"])  # a row hash's layout; runs of both kinds
def test_estimates_keep_the_gram_of_the_sketched_columns(pattern):
    rng = np.random.default_rng(3)
    m, D = 4, 10
    mask = torch.tensor([c == "1" for c in pattern])
    est = DomainEstimates(m, D, sketched=mask)
    sums = torch.as_tensor(rng.normal(size=(m, D)), dtype=torch.float32)
    counts = torch.tensor([1, 2, 0, 1])
    rows, block = est.update_rows(sums, counts, torch.ones(m, dtype=torch.bool))
    assert block.shape == (3, 2 * m) and est.block_width == 2 * m
    est.set_rows(rows, block)
    means = (sums / counts.clamp(min=1)[:, None]).double().numpy()
    means[2] = 0
    np.testing.assert_allclose(est.gram.numpy(), means @ means.T, rtol=1e-5, atol=1e-6)
    tail = means[:, mask.numpy()]
    np.testing.assert_allclose(est.gram_sketched.numpy(), tail @ tail.T, rtol=1e-5, atol=1e-6)
    # the error estimate scales with the sketched part only: exact columns add none
    G, T = est.gram.numpy(), est.gram_sketched.numpy()
    assert expected_sketch_error(G, [64.0], T) < expected_sketch_error(G, [64.0])
    assert DomainEstimates(m, D, sketched=torch.zeros(D, dtype=torch.bool)).block_width == m  # nothing sketched


def test_column_runs():
    runs = column_runs(torch.tensor([c == "1" for c in "0011101001"]))
    assert runs == [(0, 2, False), (2, 5, True), (5, 6, False), (6, 7, True), (7, 9, False), (9, 10, True)]
    assert column_runs(torch.ones(3, dtype=torch.bool)) == [(0, 3, True)]
    assert column_runs(torch.zeros(0, dtype=torch.bool)) == []


def test_nonfinite_rows_checks_only_the_rows_given():
    x = torch.ones(4, 5)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    assert nonfinite_rows(x).tolist() == [0, 1, 0, 1]
    assert nonfinite_rows(x, torch.tensor([0, 1])).tolist() == [0, 1, 0, 0]  # row 3 not asked about
    assert nonfinite_rows(x, torch.tensor([], dtype=torch.long)).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("p, m, n", [(3, 5, 12_288 * 3 + 77), (11, 15, 12_288 * 2), (20, 40, 12_288 * 3 + 5), (2, 3, 500)])
def test_add_row_products_is_a_times_b_transposed(p, m, n):
    """The round's block GEMM: chunked batched GEMM for small outputs (plus the columns' remainder), plain GEMM
    otherwise; both add a bᵀ to ``out`` on column-slice views, as ``update_rows`` calls it."""
    torch.manual_seed(p)
    a_full, b_full = torch.randn(p, n + 9), torch.randn(m, n + 9)
    a, b = a_full[:, 4:n + 4], b_full[:, 4:n + 4]  # views with a row stride wider than n
    out = torch.ones(p, m)
    add_row_products(out, a, b)
    torch.testing.assert_close(out.double(), 1 + a.double() @ b.double().T, rtol=1e-4, atol=1e-3)
