"""Per-domain gradient capture vs autograd one domain at a time (real torch GPT-2-style model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnb_ray.balance.capture import DomainGradCapture, find_capture_modules
from rnb_ray.balance.lm import build_model, grad_token_mask, per_example_loss
from rnb_ray.balance.sketch import sketch_matrix

VOCAB, SEQ = 101, 12


@pytest.fixture(scope="module")
def model():
    return build_model(None, vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, n_embd=16, pad_token_id=0, seed=0)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (7, SEQ), generator=gen)
    lengths = torch.tensor([12, 5, 9, 2, 12, 7, 3])  # right padding of different lengths
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    domains = torch.tensor([0, 2, 0, 1, 2, 2, 0])
    return ids, mask, domains


def _loss(model, ids, mask):
    return per_example_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)


def _autograd_domain_means(model, modules, ids, mask, domains, m):
    out = []
    for d in range(m):
        sel = domains == d
        model.zero_grad()
        _loss(model, ids[sel], mask[sel]).mean().backward()  # mean over the domain's examples
        out.append(torch.cat([mod.weight.grad.reshape(-1) for mod in modules.values()]).clone())
    model.zero_grad()
    return torch.stack(out)


def _captured_means(model, modules, ids, mask, domains, m, **kw):
    cap = DomainGradCapture(modules, m, **kw)
    try:
        cap.begin(domains, grad_token_mask(mask), scale=len(ids))
        _loss(model, ids, mask).mean().backward()
        cap.end()
        sums, counts = cap.take()
    finally:
        cap.remove()
        model.zero_grad()
    return torch.tensor(sums) / torch.tensor(counts, dtype=torch.float32)[:, None], counts, cap


@pytest.mark.parametrize("spec", ["head", "last_block", "head+last_block"])
def test_capture_equals_per_domain_autograd(model, spec):
    ids, mask, domains = _batch()
    modules = find_capture_modules(model, spec)
    means, counts, _ = _captured_means(model, modules, ids, mask, domains, 3)
    assert counts.tolist() == [3, 1, 3]
    expected = _autograd_domain_means(model, modules, ids, mask, domains, 3)
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-5)
    assert means.abs().max() > 1e-3  # not trivially zero


def test_sketched_capture_equals_sketch_of_autograd(model):
    ids, mask, domains = _batch(1)
    modules = find_capture_modules(model, "head")
    means, _, cap = _captured_means(model, modules, ids, mask, domains, 3, sketch_dim=64, seed=5)
    exact = _autograd_domain_means(model, modules, ids, mask, domains, 3)
    sk = cap.layers[0].sketch
    expected = torch.stack([sketch_matrix(g.reshape(VOCAB, 16), sk) for g in exact])
    assert cap.dim == 64 and means.shape == (3, 64)
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-5)


def test_eval_target_and_idle_hooks(model):
    ids, mask, domains = _batch(2)
    modules = find_capture_modules(model, "head")
    cap = DomainGradCapture(modules, 3)
    try:
        # Forward/backward without begin(), and a no_grad forward, must not accumulate anything.
        _loss(model, ids, mask).mean().backward()
        with torch.no_grad():
            cap.begin(domains, grad_token_mask(mask), scale=len(ids))
            _loss(model, ids, mask)
            cap.end()
        model.zero_grad()
        sums, counts = cap.take()
        assert not sums.any()
        cap.counts.zero_()
        cap.begin(domains, grad_token_mask(mask), scale=len(ids), target="eval")
        _loss(model, ids, mask).mean().backward()
        cap.end()
        grad = modules["lm_head"].weight.grad.reshape(-1).clone()
        total, n = cap.take_eval()
        assert n == len(ids)
        np.testing.assert_allclose(total / n, grad.numpy(), rtol=1e-4, atol=1e-6)
        assert not cap.take()[0].any()  # the training accumulator was untouched
    finally:
        cap.remove()
        model.zero_grad()


def test_find_capture_modules(model):
    assert list(find_capture_modules(model, "head")) == ["lm_head"]
    names = list(find_capture_modules(model, "last_block"))
    assert names and all(n.startswith("transformer.h.1.") for n in names)
    assert list(find_capture_modules(model, "transformer.h.0.mlp.c_fc")) == ["transformer.h.0.mlp.c_fc"]
    with pytest.raises(ValueError, match="not found"):
        find_capture_modules(model, "nope.layer")
    with pytest.raises(ValueError, match="not a linear"):
        find_capture_modules(model, "transformer.h.0")
