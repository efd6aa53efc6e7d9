"""Packing (pure): exact seq_len, no padding, EOS boundaries, domain purity, determinism, exact restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnb_ray.balance.lm import encode, load_tokenizer
from rnb_ray.balance.packing import Packer, pack_sequences
from rnb_ray.balance.sampler import DomainSampler
from rnb_ray.balance.step import next_batch

EOS = 1


def _corpus(domain: int, n: int) -> list[np.ndarray]:
    """Documents whose tokens name their domain (10·domain + 3 …) and end with EOS."""
    rng = np.random.default_rng(domain)
    return [np.append(np.full(int(rng.integers(1, 9)), 10 * domain + 3 + i % 5), EOS) for i in range(n)]


def _packer(domain: int, n: int = 12, seq_len: int = 16, seed: int = 0) -> tuple[Packer, list[np.ndarray]]:
    docs = _corpus(domain, n)
    return Packer(np.arange(n), seq_len, seed, fetch=lambda i: docs[i]), docs


def test_sequences_are_exact_unpadded_and_keep_every_document_in_order():
    p, docs = _packer(0)
    total = sum(len(d) for d in docs)
    seqs = [p.next() for _ in range(-(-total // 16))]  # enough for one epoch
    assert all(s.shape == (16,) and s.dtype == np.int64 for s in seqs)
    stream = np.concatenate(seqs)[:total]
    order = np.random.default_rng([0, 0]).permutation(12)
    np.testing.assert_array_equal(stream, np.concatenate([docs[i] for i in order]))  # nothing dropped or padded
    assert (stream == EOS).sum() == 12  # one EOS per document boundary
    assert p.state_dict()["epoch"] == 1  # the last sequence ran into the next epoch


def test_deterministic_epochs_reshuffle_and_state_restores_exactly():
    a, _ = _packer(1, seed=5)
    b, _ = _packer(1, seed=5)
    first = [a.next() for _ in range(30)]
    assert all(np.array_equal(x, y) for x, y in zip(first, [b.next() for _ in range(30)], strict=True))
    assert a.epoch >= 2
    orders = [np.random.default_rng([5, e]).permutation(12) for e in range(2)]
    assert not np.array_equal(*orders)  # a new order every epoch
    c, _ = _packer(1, seed=5)
    for _ in range(7):
        c.next()
    state = c.state_dict()
    d, _ = _packer(1, seed=5)
    d.load_state_dict(state)
    np.testing.assert_array_equal(np.stack([c.next() for _ in range(9)]), np.stack([d.next() for _ in range(9)]))


def test_batches_are_domain_pure_and_sorted_for_capture():
    packers = [_packer(d)[0] for d in range(3)]
    sampler = DomainSampler(packers, seed=3)
    tok = load_tokenizer(None, "byte")
    batch = next_batch(sampler, np.array([0.2, 0.5, 0.3]), 12, tok, 16, by_domain=True)
    assert batch.input_ids.shape == (12, 16) and bool(batch.attention_mask.all())  # no padding at all
    assert list(batch.domains) == sorted(batch.domains)
    for row, d in zip(batch.input_ids.numpy(), batch.domains, strict=True):
        body = row[row != EOS]
        assert ((body - 3) // 10 == d).all()  # every token of the sequence comes from its own domain
    state = sampler.state_dict()
    again = DomainSampler([_packer(d)[0] for d in range(3)], seed=3)
    again.load_state_dict(state)
    x = next_batch(sampler, np.array([0.2, 0.5, 0.3]), 12, tok, 16, by_domain=True)
    y = next_batch(again, np.array([0.2, 0.5, 0.3]), 12, tok, 16, by_domain=True)
    assert torch.equal(x.input_ids, y.input_ids)


def test_pack_sequences_and_encode_of_unequal_lengths():
    docs = _corpus(2, 10)
    seqs = pack_sequences(docs, 8, max_sequences=3)
    assert len(seqs) == 3 and all(len(s) == 8 for s in seqs)
    np.testing.assert_array_equal(np.concatenate(seqs), np.concatenate(docs)[:24])
    short = pack_sequences([np.array([5, EOS])], 8, max_sequences=3)
    assert [s.tolist() for s in short] == [[5, EOS]]  # no full sequence: the one short one is kept
    assert pack_sequences([np.array([EOS])], 8, 3) == []
    tok = load_tokenizer(None, "byte")
    ids, am = encode(tok, [np.arange(4), np.arange(2)], 8)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 1, tok.pad_token_id, tok.pad_token_id]]
    assert am.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_empty_domain_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="no documents"):
        Packer(np.arange(0), 4, 0, fetch=lambda i: np.array([])).next()
    with pytest.raises(ValueError, match="empty"):
        Packer(np.arange(3), 4, 0, fetch=lambda i: np.array([], dtype=np.int64)).next()
