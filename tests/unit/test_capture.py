"""Per-domain gradient capture vs autograd one domain at a time (real torch GPT-2-style model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnb_ray.balance.capture import DomainGradCapture, find_capture_modules
from rnb_ray.balance.lm import build_model, grad_token_mask, per_example_loss
from rnb_ray.balance.sketch import RowHash, row_hash_matrix, sketch_matrix

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
    means, counts, _ = _captured_means(model, modules, ids, mask, domains, 3, slots=3 if spec == "head" else None)
    assert counts.tolist() == [3, 1, 3]
    expected = _autograd_domain_means(model, modules, ids, mask, domains, 3)
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-5)
    assert means.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("kind", ["gaussian", "rowhash"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("slots", [None, 2])  # sums by domain, or in the rows of the domains seen (grown to 3)
def test_sketched_capture_equals_sketch_of_autograd(model, kind, padded, slots):
    ids, mask, domains = _batch(1)
    if not padded:  # every position carries gradient and the batch is domain-sorted: the row hash skips its gather
        mask = torch.ones_like(mask)
        ids = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(3))
        domains = torch.sort(domains).values
    modules = find_capture_modules(model, "head")
    means, _, cap = _captured_means(model, modules, ids, mask, domains, 3, sketch_dim=64, seed=5, sketch_kind=kind,
                                    slots=slots)
    exact = _autograd_domain_means(model, modules, ids, mask, domains, 3)
    sk = cap.layers[0].sketch
    if kind == "rowhash":
        assert isinstance(sk, RowHash) and cap.dim == 64 * 16
        expected = torch.stack([row_hash_matrix(g.reshape(VOCAB, 16), sk) for g in exact])
    else:
        assert cap.dim == 64
        expected = torch.stack([sketch_matrix(g.reshape(VOCAB, 16), sk) for g in exact])
    assert means.shape == (3, cap.dim) and means.abs().max() > 1e-3
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-5)


def test_row_hash_keeps_small_layers_exact_and_refuses_unknown_kinds(model):
    """A layer with no more rows than buckets is captured exactly (hashing would only add collisions)."""
    ids, mask, domains = _batch(4)
    modules = find_capture_modules(model, "head+last_block")
    means, _, cap = _captured_means(model, modules, ids, mask, domains, 3, sketch_dim=64, sketch_kind="rowhash")
    kinds = {layer.name: type(layer.sketch).__name__ for layer in cap.layers}
    assert kinds["lm_head"] == "RowHash" and all(v == "NoneType" for k, v in kinds.items() if k != "lm_head")
    exact = _autograd_domain_means(model, modules, ids, mask, domains, 3)
    head = cap.layers[0].size
    torch.testing.assert_close(means[:, head:], exact[:, VOCAB * 16:], rtol=1e-4, atol=1e-5)  # the block: exact
    with pytest.raises(ValueError, match="unknown sketch kind"):
        DomainGradCapture(modules, 3, sketch_dim=8, sketch_kind="fourier")


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


# ---------------------------------------------------------------------------------------------- fused backward
def _tied_model():
    from transformers import GPT2LMHeadModel

    from rnb_ray.balance.lm import tiny_config

    torch.manual_seed(1)
    cfg = tiny_config(VOCAB, seq_len=SEQ, n_layer=2, n_head=2, n_embd=16, pad_token_id=0)
    cfg.tie_word_embeddings = True  # GPT-2's own layout: lm_head.weight is the input embedding
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _padded_batch(seed, domains, lengths):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), SEQ), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, torch.tensor(domains)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# Unordered domains (rows gathered), domain-ordered (contiguous slices), and an example with one token
# (no target at all: its output-gradient rows are all zero) next to padded ones.
BATCHES = {"unordered": ([0, 2, 0, 1, 2, 2, 0], [12, 5, 9, 2, 12, 7, 3]),
           "ordered": ([0, 0, 1, 1, 1, 2, 2], [12, 1, 9, 2, 12, 7, 3])}


@pytest.mark.parametrize("order", list(BATCHES))
@pytest.mark.parametrize("spec", ["head", "last_block", "head+last_block"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_capture_leaves_every_param_grad_unchanged(model, spec, tied, order):
    """The model's gradients with capture on == without capture, for every parameter (the per-domain GEMMs
    partition the ordinary weight gradient instead of repeating it)."""
    net = _tied_model() if tied else model
    ids, mask, domains = _padded_batch(3, *BATCHES[order])
    net.zero_grad()
    _loss(net, ids, mask).mean().backward()
    plain = _grads(net)
    net.zero_grad()
    cap = DomainGradCapture(find_capture_modules(net, spec), 3)
    try:
        cap.begin(domains, grad_token_mask(mask), scale=len(ids))
        _loss(net, ids, mask).mean().backward()
        cap.end()
        fused = _grads(net)
        assert cap.sums.abs().max() > 1e-3
    finally:
        cap.remove()
        net.zero_grad()
    assert fused.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-6, atol=1e-6, msg=name)


def test_tied_head_captures_only_the_head_contribution():
    """With lm_head tied to the input embedding, the captured sums are the head's share only: equal to
    per-domain autograd on an untied copy whose head is a separate parameter."""
    tied = _tied_model()
    untied = _tied_model()
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    ids, mask, domains = _padded_batch(4, [1, 0, 2, 1, 0, 2, 2], [12, 8, 4, 11, 2, 9, 12])
    means, counts, _ = _captured_means(tied, find_capture_modules(tied, "head"), ids, mask, domains, 3)
    expected = _autograd_domain_means(untied, {"lm_head": untied.lm_head}, ids, mask, domains, 3)
    assert counts.tolist() == [2, 2, 3]
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-5)
    # ... and differs from the tied parameter's total gradient (which includes the embedding's share).
    tied.zero_grad()
    _loss(tied, ids, mask).mean().backward()
    total = tied.lm_head.weight.grad.reshape(-1).clone()
    tied.zero_grad()
    head_only = (means * torch.as_tensor(counts, dtype=torch.float32)[:, None]).sum(0) / len(ids)
    assert (total - head_only).abs().max() > 1e-4


def test_micro_batches_accumulate(model):
    """Two micro-batches (gradient accumulation), both forwards before one backward: the sums are those of
    the two batches, the counts add, and param.grad equals accumulation without capture."""
    a = _padded_batch(5, [0, 1, 1, 2], [12, 6, 3, 9])
    b = _padded_batch(6, [2, 2, 0, 1], [4, 12, 12, 7])
    modules = find_capture_modules(model, "head+last_block")

    def two_losses():
        return sum(_loss(model, ids, mask).mean() / 2 for ids, mask, _ in (a, b))

    model.zero_grad()
    two_losses().backward()
    plain = _grads(model)
    model.zero_grad()
    cap = DomainGradCapture(modules, 3)
    try:
        losses = []
        for ids, mask, doms in (a, b):
            cap.begin(doms, grad_token_mask(mask), scale=2 * len(ids))  # loss = mean of two batch means
            losses.append(_loss(model, ids, mask).mean() / 2)
        cap.end()
        sum(losses).backward()
        fused = _grads(model)
        sums, counts = cap.take()
    finally:
        cap.remove()
        model.zero_grad()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-6, atol=1e-6, msg=name)
    assert counts.tolist() == [2, 3, 3]
    expected = torch.zeros(3, sums.shape[1])
    for ids, mask, doms in (a, b):  # per-example gradient sums, one domain at a time
        for d in range(3):
            sel = doms == d
            model.zero_grad()
            _loss(model, ids[sel], mask[sel]).sum().backward()
            expected[d] += torch.cat([m.weight.grad.reshape(-1) for m in modules.values()])
    model.zero_grad()
    torch.testing.assert_close(torch.tensor(sums), expected, rtol=1e-4, atol=1e-5)


def test_exact_capture_adds_no_matmul_flops(model):
    """Counted by torch's own FLOP counter: exact capture does the same matmul work as a plain backward
    (sketching adds its projections)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids, mask, domains = _batch(7)
    modules = find_capture_modules(model, "head+last_block")

    def counted(**kw):
        cap = DomainGradCapture(modules, 3, **kw) if kw else None
        try:
            with FlopCounterMode(display=False) as fc:
                if cap:
                    cap.begin(domains, grad_token_mask(mask), scale=len(ids))
                _loss(model, ids, mask).mean().backward()
            return fc.get_total_flops(), cap
        finally:
            if cap:
                cap.remove()
            model.zero_grad()

    plain, _ = counted()
    exact, cap = counted(sketch_dim=0)
    sketched, _ = counted(sketch_dim=64)
    assert exact == plain
    assert sketched > plain
    # The grouped GEMMs are exactly the captured layers' weight gradients: 2 · rows · out · in each.
    assert cap.flops_grouped == sum(2 * ids.numel() * m.weight.numel() for m in modules.values())
    assert 0 < cap.flops < cap.flops_grouped / 10  # only the accumulation remains


def test_bf16_autocast(model):
    """Under bf16 autocast the fused layer computes in bf16 like autocast's linear; the per-domain parts
    add up to the head's gradient."""
    ids, mask, domains = _batch(8)
    head = find_capture_modules(model, "head")
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    per_example_loss(logits, ids, mask).mean().backward()
    plain = head["lm_head"].weight.grad.clone()
    model.zero_grad()
    cap = DomainGradCapture(head, 3)
    try:
        cap.begin(domains, grad_token_mask(mask), scale=len(ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert logits.dtype == torch.bfloat16
        per_example_loss(logits, ids, mask).mean().backward()
        cap.end()
        fused = head["lm_head"].weight.grad.clone()
        sums, _ = cap.take()
    finally:
        cap.remove()
        model.zero_grad()
    assert fused.dtype == torch.float32
    scale = plain.abs().max()
    assert (fused - plain).abs().max() < 2e-2 * scale
    assert (torch.tensor(sums).sum(0) / len(ids) - fused.reshape(-1)).abs().max() < 2e-2 * scale


def test_ddp_grads_and_capture(model, tmp_path):
    """Wrapped in DistributedDataParallel (gloo, one rank): DDP's gradient hooks see the fused weight
    gradient, param.grad matches the unwrapped model without capture, and remove() restores the modules."""
    import copy

    import torch.distributed as dist

    ids, mask, domains = _batch(9)
    net = copy.deepcopy(model)
    net.zero_grad()
    _loss(net, ids, mask).mean().backward()
    plain = _grads(net)
    net.zero_grad()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        modules = find_capture_modules(ddp, "head+last_block")
        cap = DomainGradCapture(modules, 3)
        cap.begin(domains, grad_token_mask(mask), scale=len(ids))
        per_example_loss(ddp(input_ids=ids, attention_mask=mask).logits, ids, mask).mean().backward()
        cap.end()
        fused = _grads(net)
        means = torch.tensor(cap.take()[0]) / torch.tensor([3.0, 1.0, 3.0])[:, None]
        cap.remove()
        assert all("forward" not in m.__dict__ and not hasattr(m, "_rnb_capture") for m in modules.values())
    finally:
        dist.destroy_process_group()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-6, atol=1e-6, msg=name)
    expected = _autograd_domain_means(net, modules, ids, mask, domains, 3)
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-5)


def test_capture_refuses_a_second_capture_and_bad_domains(model):
    head = find_capture_modules(model, "head")
    cap = DomainGradCapture(head, 3)
    try:
        with pytest.raises(ValueError, match="already captured"):
            DomainGradCapture(head, 3)
        ids, mask, _ = _batch()
        with pytest.raises(ValueError, match=r"domain ids must lie in \[0, 3\)"):
            cap.begin(torch.tensor([0, 1, 2, 3, 0, 0, 0]), grad_token_mask(mask), scale=7)
        with pytest.raises(ValueError, match="token_mask must be"):
            cap.begin(torch.tensor([0, 1]), grad_token_mask(mask), scale=7)
    finally:
        cap.remove()
    DomainGradCapture(head, 3).remove()  # free again after remove()


def test_row_hash_capture_keeps_frequent_rows_exact(model):
    ids, mask, domains = _batch(5)
    modules = find_capture_modules(model, "head")
    rows = torch.tensor([3, 50, 77])
    means, _, cap = _captured_means(model, modules, ids, mask, domains, 3, sketch_dim=16,
                                    exact_rows={"lm_head": rows})
    exact = _autograd_domain_means(model, modules, ids, mask, domains, 3).view(3, VOCAB, 16)
    torch.testing.assert_close(means.view(3, 16, 16)[:, :3], exact[:, rows], rtol=1e-4, atol=1e-5)
    assert cap.sketched_columns().view(16, 16)[:3].sum() == 0 and cap.sketched_columns().view(16, 16)[3:].all()
    assert cap.effective_dims() == [13.0]


@pytest.mark.parametrize("m", [8, 3])  # few domains touched (only their rows are zeroed) or most of them
def test_reset_starts_the_next_round_from_zero(model, m):
    modules = find_capture_modules(model, "head")
    ids, mask, domains = _batch(1)
    second = torch.tensor([1, 1, 1, 1, 1, 1, 1])
    cap = DomainGradCapture(modules, m)
    try:
        for doms in (domains, second):  # round 1 (domains 0, 1, 2), reset, round 2 (domain 1 only)
            cap.begin(doms, grad_token_mask(mask), scale=len(ids))
            _loss(model, ids, mask).mean().backward()
            cap.end()
            model.zero_grad()
            if doms is domains:
                cap.reset()
        sums, counts = cap.sums.clone(), cap.counts.clone()
    finally:
        cap.remove()
        model.zero_grad()
    assert counts.tolist() == [0, 7] + [0] * (m - 2)
    assert torch.count_nonzero(sums[[d for d in range(m) if d != 1]]) == 0  # nothing left from round 1
    want, _, _ = _captured_means(model, modules, ids, mask, second, m)
    torch.testing.assert_close(sums[1] / 7, want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slots", [1, 8])  # fewer rows than the round's domains (they grow), or room to spare
def test_slotted_capture_holds_the_same_sums_in_the_rows_of_the_domains_seen(model, slots):
    """With ``slots`` a domain adds into the next free row the first time a round sees it: over two micro-batches
    the rows hold the by-domain capture's sums, ``take()`` returns them by domain, and ``reset`` frees the rows."""
    a = _padded_batch(5, [3, 1, 1, 3], [12, 6, 3, 9])
    b = _padded_batch(6, [0, 3, 3, 1], [4, 12, 12, 7])
    modules = find_capture_modules(model, "head")
    results = []
    for kw in ({}, {"slots": slots}):
        cap = DomainGradCapture(modules, 5, **kw)
        try:
            for ids, mask, doms in (a, b):
                cap.begin(doms, grad_token_mask(mask), scale=len(ids))
                _loss(model, ids, mask).mean().backward()
                cap.end()
                model.zero_grad()
            rows, slot = cap.sums.clone(), cap.slot.clone()
            results.append((cap.take(), rows, slot))
            after = (cap.used, cap.slot.clone(), torch.count_nonzero(cap.sums))
        finally:
            cap.remove()
            model.zero_grad()
    (want, counts), by_domain, identity = results[0]
    (got, got_counts), rows, slot = results[1]
    assert torch.equal(identity, torch.arange(5))
    assert slot.tolist() == [2, 0, -1, 1, -1]  # first sight: 1 and 3 in the first batch, 0 in the second
    assert rows.shape[0] == (4 if slots == 1 else 5)  # 1 row grown (doubling) for the 3 domains seen; at most m
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for d in (0, 1, 3):
        torch.testing.assert_close(rows[slot[d]], by_domain[d], rtol=1e-6, atol=1e-7)
    assert after[0] == 0 and bool((after[1] == -1).all()) and after[2] == 0
    with pytest.raises(ValueError, match="slots"):
        DomainGradCapture(modules, 5, slots=0)
