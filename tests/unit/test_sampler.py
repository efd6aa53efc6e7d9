"""The domain sampler: draws follow p, streams reshuffle and restart, state replays exactly."""

from __future__ import annotations

import numpy as np
import pytest

from rnb_ray.balance.sampler import Chunk, DomainSampler, DomainStream


def _loader(key, rows):
    return [f"d{key // 10}-c{key % 10}-r{r}" for r in rows]


def _sampler(seed=0):
    streams = []
    for d, n_chunks in enumerate([1, 2, 3]):
        chunks = [Chunk(d * 10 + c, np.arange(4 + c)) for c in range(n_chunks)]
        streams.append(DomainStream(chunks, seed=seed * 100 + d, loader=_loader))
    return DomainSampler(streams, seed=seed)


def test_domains_follow_the_mixture():
    s = _sampler()
    p = np.array([0.2, 0.5, 0.3])
    doms = s.draw(p, 20000)
    np.testing.assert_allclose(np.bincount(doms, minlength=3) / 20000, p, atol=0.015)
    assert not (s.draw(np.array([0.5, 0.0, 0.5]), 5000) == 1).any()


def test_examples_come_from_the_drawn_domain():
    texts, doms = _sampler().next_batch(np.full(3, 1 / 3), 64)
    assert all(t.startswith(f"d{d}-") for t, d in zip(texts, doms, strict=True))


def test_stream_reshuffles_and_restarts():
    chunks = [Chunk(0, np.arange(5)), Chunk(1, np.arange(3))]
    st = DomainStream(chunks, seed=7, loader=_loader)
    epochs = [[st.next() for _ in range(8)] for _ in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(_loader(0, range(5)) + _loader(1, range(3)))  # each epoch: every row once
    assert st.epoch == 2  # the restart happens lazily, on the next draw
    st.next()
    assert st.epoch == 3
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # a new order per epoch


def test_state_replays_the_same_examples():
    p = np.array([0.3, 0.3, 0.4])
    a = _sampler(seed=3)
    for _ in range(7):
        a.next_batch(p, 5)
    state = a.state_dict()
    after = [a.next_batch(p, 5) for _ in range(6)]
    b = _sampler(seed=3)
    b.load_state_dict(state)
    again = [b.next_batch(p, 5) for _ in range(6)]
    for (ta, da), (tb, db) in zip(after, again, strict=True):
        assert ta == tb and da.tolist() == db.tolist()


def test_different_seeds_differ():
    p = np.full(3, 1 / 3)
    assert _sampler(1).next_batch(p, 20)[0] != _sampler(2).next_batch(p, 20)[0]


def test_bad_mixture_and_empty_stream():
    s = _sampler()
    with pytest.raises(ValueError, match="invalid mixture"):
        s.draw(np.array([0.5, 0.5]), 3)
    with pytest.raises(ValueError, match="invalid mixture"):
        s.draw(np.array([0.5, -0.5, 1.0]), 3)
    with pytest.raises(ValueError, match="no examples"):
        DomainStream([], seed=0, loader=_loader).next()
