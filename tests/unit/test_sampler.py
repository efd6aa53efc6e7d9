"""The domain sampler: draws follow p, streams shuffle through a bounded buffer, reshuffle per epoch, and
their state replays exactly."""

from __future__ import annotations

import numpy as np
import pytest

from rnb_ray.balance.sampler import DomainSampler, DomainStream

SIZES = {0: 5, 1: 3, 2: 7}  # rows per unit in the streams below


def _loader(unit, start, batch=2, reads=None):
    """Unit ``(domain, u)`` holds ``SIZES[u]`` rows; yields them in batches of ``batch`` from ``start``."""
    d, u = unit
    if reads is not None:
        reads.append((unit, start))
    rows = list(range(start, SIZES[u]))
    for i in range(0, len(rows), batch):
        yield rows[i:i + batch], [f"d{d}-u{u}-r{r}" for r in rows[i:i + batch]]


def _all(d, units):
    return sorted(f"d{d}-u{u}-r{r}" for u in units for r in range(SIZES[u]))


def _sampler(seed=0, buffer=4):
    streams = [DomainStream([(d, u) for u in range(n)], seed=seed * 100 + d, loader=_loader, buffer=buffer)
               for d, n in enumerate([1, 2, 3])]
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


@pytest.mark.parametrize("buffer", [1, 3, 8, 100])
def test_every_epoch_is_every_row_once_in_a_new_order(buffer):
    st = DomainStream([(0, 0), (0, 1), (0, 2)], seed=7, loader=_loader, buffer=buffer)
    epochs = [[st.next() for _ in range(15)] for _ in range(4)]
    for e in epochs:
        assert sorted(e) == _all(0, range(3))
    assert st.epoch == 3  # the restart happens lazily, on the next draw
    st.next()
    assert st.epoch == 4
    assert len({tuple(e) for e in epochs}) > 1  # a new order per epoch


def test_the_buffer_bounds_what_is_held_and_shuffles_within_it():
    st = DomainStream([(0, 2)], seed=1, loader=_loader, buffer=3)
    first = [st.next() for _ in range(3)]
    assert len(st._texts) == 3  # one block of `buffer` texts in memory
    assert sorted(first) == [f"d0-u2-r{r}" for r in range(3)]  # the first block is the first rows read, permuted
    order = [int(t.rsplit("r", 1)[1]) for t in first + [st.next() for _ in range(4)]]
    assert sorted(order[3:6]) == [3, 4, 5]
    big = DomainStream([(0, 2)], seed=1, loader=_loader, buffer=7)
    assert [big.next() for _ in range(7)] != [f"d0-u2-r{r}" for r in range(7)]  # permuted


def test_state_replays_the_same_examples_and_rereads_one_block():
    p = np.array([0.3, 0.3, 0.4])
    a = _sampler(seed=3)
    for _ in range(7):
        a.next_batch(p, 5)
    state = a.state_dict()
    assert set(state["streams"][2]) == {"epoch", "unit_pos", "row", "block", "offset"}
    after = [a.next_batch(p, 5) for _ in range(6)]
    b = _sampler(seed=3)
    b.load_state_dict(state)
    again = [b.next_batch(p, 5) for _ in range(6)]
    for (ta, da), (tb, db) in zip(after, again, strict=True):
        assert ta == tb and da.tolist() == db.tolist()


def test_restore_mid_unit_reads_from_the_block_start():
    reads: list = []
    st = DomainStream([(0, 2), (0, 0)], seed=5, loader=lambda u, s: _loader(u, s, reads=reads), buffer=3)
    for _ in range(4):
        st.next()
    state = st.state_dict()
    rest = [st.next() for _ in range(20)]
    reads.clear()
    again = DomainStream([(0, 2), (0, 0)], seed=5, loader=lambda u, s: _loader(u, s, reads=reads), buffer=3)
    again.load_state_dict(state)
    current = again.units[int(again._order()[state["unit_pos"]])]
    assert [again.next() for _ in range(20)] == rest
    assert state["row"] == 3 and state["offset"] == 1  # in the second block, which starts inside a unit
    assert reads[0] == (current, 3)  # only that unit's tail is read again


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
    with pytest.raises(ValueError, match="no examples"):  # units that yield nothing
        DomainStream([(0, 0)], seed=0, loader=lambda u, s: iter(())).next()
