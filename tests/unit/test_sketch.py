"""Random-projection sketches of linear-layer gradients (pure torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnb_ray.balance.gram import gram
from rnb_ray.balance.sketch import (
    frequent_rows,
    gram_relative_error,
    hash_rows,
    make_layer_sketch,
    make_row_hash,
    row_hash_matrix,
    sketch_matrix,
    sketch_shape,
    sketch_tokens,
)


def test_sketch_shape_respects_the_layer_and_budget():
    assert sketch_shape(1000, 64, 256) == (16, 16)
    assert sketch_shape(1000, 8, 256) == (32, 8)
    k1, k2 = sketch_shape(5, 3, 1000)
    assert (k1, k2) == (5, 3)
    with pytest.raises(ValueError):
        sketch_shape(4, 4, 0)


def test_tokens_sketch_equals_sketch_of_the_formed_gradient():
    gen = torch.Generator().manual_seed(0)
    delta, h = torch.randn(50, 40, generator=gen), torch.randn(50, 24, generator=gen)
    sk = make_layer_sketch(40, 24, 64, seed=3)
    torch.testing.assert_close(sketch_tokens(delta, h, sk), sketch_matrix(delta.T @ h, sk), rtol=1e-4, atol=1e-4)


def test_same_seed_same_projection():
    a, b, c = (make_layer_sketch(30, 20, 36, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.r_out, b.r_out) and torch.equal(a.r_in, b.r_in)
    assert not torch.equal(a.r_out, c.r_out)


def _domain_grads(m=6, out=64, inp=48, seed=0):
    """Correlated per-domain gradients (a shared component plus domain-specific parts), like real ones."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((out, inp))
    return [torch.tensor(0.7 * shared + rng.standard_normal((out, inp)), dtype=torch.float32) for _ in range(m)]


def test_sketched_gram_error_shrinks_with_dimension():
    grads = _domain_grads()
    exact = gram(np.stack([g.reshape(-1).numpy() for g in grads]))
    errors = []
    for k in (16, 64, 256, 1024):
        errs = []
        for seed in range(8):
            sk = make_layer_sketch(64, 48, k, seed=seed)
            approx = gram(np.stack([sketch_matrix(g, sk).numpy() for g in grads]))
            errs.append(gram_relative_error(exact, approx))
        errors.append(float(np.mean(errs)))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 0.15
    assert errors[0] > 2 * errors[3]


def test_row_hash_of_tokens_equals_row_hash_of_the_formed_gradient():
    gen = torch.Generator().manual_seed(0)
    delta, h = torch.randn(9, 40, generator=gen), torch.randn(9, 24, generator=gen)
    rh = make_row_hash(40, 24, 8, seed=3)
    torch.testing.assert_close((hash_rows(delta, rh).T @ h).reshape(-1), row_hash_matrix(delta.T @ h, rh),
                               rtol=1e-4, atol=1e-4)
    assert rh.dim == 8 * 24
    again, other = make_row_hash(40, 24, 8, seed=3), make_row_hash(40, 24, 8, seed=4)
    assert torch.equal(rh.index, again.index) and not torch.equal(rh.index, other.index)  # the same on every worker
    with pytest.raises(ValueError, match="buckets"):
        make_row_hash(40, 24, 41, seed=0)


def test_row_hash_gram_is_unbiased_and_tracks_heavy_rows():
    """Real head gradients concentrate on few rows (the target tokens'): a row hash keeps those rows whole,
    so at the same number of stored numbers its Gram error is far below a Gaussian sketch's."""
    rng = np.random.default_rng(0)
    out, inp, m = 2000, 32, 5
    heavy = rng.choice(out, 20, replace=False)
    grads = []
    for _ in range(m):
        g = 0.01 * rng.standard_normal((out, inp))
        g[heavy] += rng.standard_normal((20, inp)) + 0.5 * rng.standard_normal((1, inp))
        grads.append(torch.tensor(g, dtype=torch.float32))
    exact = gram(np.stack([g.reshape(-1).numpy() for g in grads]))
    hashed = [gram(np.stack([row_hash_matrix(g, make_row_hash(out, inp, 64, seed=s)).numpy() for g in grads]))
              for s in range(40)]
    mean = np.mean(hashed, axis=0)
    assert np.abs(mean - exact).max() < 0.1 * np.abs(exact).max()  # unbiased: the average over hashes
    err_hash = np.mean([gram_relative_error(exact, g) for g in hashed[:8]])
    err_gauss = np.mean([gram_relative_error(exact, gram(np.stack(
        [sketch_matrix(g, make_layer_sketch(out, inp, 64 * inp, seed=s)).numpy() for g in grads]))) for s in range(8)])
    assert err_hash < 0.5 * err_gauss, (err_hash, err_gauss)


def test_row_hash_keeps_given_rows_exact():
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(50, 6, generator=gen)
    rows = torch.tensor([31, 2, 7])
    rh = make_row_hash(50, 6, 8, seed=0, exact_rows=rows)
    assert (rh.exact, rh.hashed, rh.buckets) == (3, 5, 8)
    out = row_hash_matrix(grad, rh).view(8, 6)
    torch.testing.assert_close(out[:3], grad[torch.tensor([2, 7, 31])])  # in ascending row order
    rest = torch.tensor([v for v in range(50) if v not in (2, 7, 31)])
    assert int(rh.index[rest].min()) >= 3  # every other row is hashed into the 5 shared buckets
    assert torch.isfinite(out).all() and out[3:].abs().sum() > 0
    delta, h = torch.randn(4, 50, generator=gen), torch.randn(4, 6, generator=gen)
    torch.testing.assert_close((hash_rows(delta, rh).T @ h).reshape(-1), row_hash_matrix(delta.T @ h, rh),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fewer than"):
        make_row_hash(50, 6, 3, seed=0, exact_rows=rows)  # no bucket left for the other rows
    with pytest.raises(ValueError, match="lie in"):
        make_row_hash(50, 6, 8, seed=0, exact_rows=torch.tensor([50]))


def test_frequent_rows_by_count_ties_to_the_lower_row():
    counts = torch.tensor([0.0, 5, 1, 5, 0, 9, 1])
    assert frequent_rows(counts, 3).tolist() == [1, 3, 5]
    assert frequent_rows(counts, 4).tolist() == [1, 2, 3, 5]
    assert frequent_rows(counts, 10).tolist() == [1, 2, 3, 5, 6]  # never a row that was not seen


def test_frequent_rows_make_the_row_hash_track_a_zipfian_head():
    """A head whose gradient lives mostly on frequent tokens' rows: keeping those exact cuts the Gram error."""
    rng = np.random.default_rng(0)
    out, inp, m = 3000, 16, 6
    freq = 1.0 / np.arange(1, out + 1)  # Zipf
    grads = [torch.tensor(freq[:, None] * rng.standard_normal((out, inp)) + 0.3 * freq[:, None] * rng.standard_normal((1, inp)),
                          dtype=torch.float32) for _ in range(m)]
    exact = gram(np.stack([g.reshape(-1).numpy() for g in grads]))

    def err(n_exact):
        return np.mean([gram_relative_error(exact, gram(np.stack([row_hash_matrix(g, make_row_hash(
            out, inp, 128, seed=s, exact_rows=frequent_rows(torch.tensor(freq), n_exact) if n_exact else None)).numpy()
            for g in grads]))) for s in range(6)])

    plain, frequent = err(0), err(96)
    assert frequent < 0.25 * plain, (frequent, plain)
