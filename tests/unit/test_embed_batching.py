"""Length-sorted embedding: the grouping helper, and the real model's rows staying matched to their texts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rnb_ray.regroup.embed import (
    EMBEDDING,
    EMPTY,
    Embedder,
    embeddings_numpy,
    encode_by_length,
    length_batches,
    load_model,
    resolve_model,
    token_lengths,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_docs,max_tokens", [(1, 10**6), (4, 64), (16, 256), (128, 2048), (7, 1)])
def test_length_batches_cover_every_position_once_within_limits(seed, max_docs, max_tokens):
    lengths = np.random.default_rng(seed).integers(0, 300, size=257)
    groups = length_batches(lengths, max_docs, max_tokens)
    flat = np.concatenate(groups)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(lengths)))  # each position exactly once
    for g in groups:
        assert 1 <= len(g) <= max_docs
        assert len(g) == 1 or len(g) * lengths[g].max() <= max_tokens
    # longest first: concatenated groups are sorted by length, ties in input order
    assert (np.diff(lengths[flat]) <= 0).all()
    for a, b in zip(flat[:-1], flat[1:], strict=True):
        if lengths[a] == lengths[b]:
            assert a < b


def test_length_batches_pack_short_texts_and_isolate_long_ones():
    lengths = np.array([10, 300, 10, 10, 250, 10])
    groups = [g.tolist() for g in length_batches(lengths, max_docs=128, max_tokens=256)]
    # 300 > budget: alone; 250: alone (2 × 250 > 256); the four 10-token texts share one pass
    assert groups == [[1], [4], [0, 2, 3, 5]]
    assert length_batches(np.array([], dtype=np.int64), 8, 64) == []
    with pytest.raises(ValueError):
        length_batches(lengths, 0, 64)


@pytest.fixture(scope="module")
def model():
    return load_model(resolve_model(None).path, threads=1)


TEXTS = [
    "Return the number of items.",
    "x",
    " ".join(f"word{i}" for i in range(400)),  # beyond the model's 256-token limit: truncated
    "Open a file and return a stream. Raise OSError upon failure. " * 5,
    "Sort a list in place.",
    "A much longer explanation of what this function does, with details about arguments and return values. " * 3,
]


def test_token_lengths_are_what_the_model_sees(model):
    lens = token_lengths(model, TEXTS)
    assert lens[2] == model.max_seq_length  # truncated like the forward pass
    assert lens[1] == 3  # [CLS] x [SEP]
    assert (lens[[0, 4]] < lens[3]).all()


def test_encode_by_length_matches_one_text_at_a_time_in_input_order(model):
    E = encode_by_length(model, TEXTS, batch_size=3, max_tokens=300)
    one_by_one = np.stack([model.encode([t], normalize_embeddings=True)[0] for t in TEXTS])
    assert E.dtype == np.float32 and E.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(E, one_by_one, atol=2e-5)
    # rows really differ (a permutation of them would fail the comparison above)
    assert np.abs(E[0] - E[2]).max() > 0.05


def test_embedder_keeps_row_order_and_flags_empty_texts(model):
    texts = ["", *TEXTS[:3], "   ", None, *TEXTS[3:]]
    ids = list(range(len(texts)))
    batch = pa.table({"id": ids, "text": pa.array(texts, pa.string())})
    emb = Embedder(resolve_model(None).path, "text", threads=1, batch_size=2, max_tokens=64)
    out = emb(batch)
    assert out.column("id").to_pylist() == ids
    empty = out.column(EMPTY).to_pylist()
    assert empty == [t is None or not t.strip() for t in texts]
    E = embeddings_numpy(out.column(EMBEDDING))
    keep = [i for i, t in enumerate(texts) if not empty[i]]
    expected = np.stack([model.encode([texts[i]], normalize_embeddings=True)[0] for i in keep])
    np.testing.assert_allclose(E[keep], expected, atol=2e-5)
    assert not E[[0, 4, 5]].any()
