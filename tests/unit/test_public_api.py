"""rnb_ray.api without Ray: capture on a plain module, the in-process mixer, the sampler, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rnb_ray import DomainMixer, GradientCapture, domain_sampler  # the lazy re-exports
from rnb_ray.api import load_state, save_state
from rnb_ray.errors import RnbError


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_capture_sums_are_per_domain_autograd():
    model = _mlp()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    doms = torch.tensor([1, 0, 1, 1, 0, 0])  # not ordered by domain: gathered once
    cap = GradientCapture(model, num_domains=2, layers="head")
    with cap.batch(doms):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    sums, counts = cap.take()
    cap.remove()
    assert counts.tolist() == [3, 3] and cap.counts.tolist() == [0, 0]
    for d in range(2):  # each domain's sum of per-example gradients, by plain autograd
        model.zero_grad()
        sel = doms == d
        torch.nn.functional.cross_entropy(model(x[sel]), y[sel], reduction="sum").backward()
        np.testing.assert_allclose(sums[d], model[2].weight.grad.reshape(-1).numpy(), rtol=1e-5, atol=1e-7)


def test_row_hash_capture_with_exact_rows():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 12))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 11])
    doms = torch.tensor([0, 0, 0, 1, 1, 1])
    cap = GradientCapture(model, 2, sketch_dim=4, exact_rows={"2": [11, 0]})
    assert cap.dim == 4 * 8  # 4 buckets (rows 0 and 11 exact, two shared) × 8 inputs
    with cap.batch(doms):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    sums, _ = cap.take()
    cap.remove()
    for d in range(2):
        model.zero_grad()
        sel = doms == d
        torch.nn.functional.cross_entropy(model(x[sel]), y[sel], reduction="sum").backward()
        np.testing.assert_allclose(sums[d].reshape(4, 8)[:2], model[2].weight.grad[[0, 11]].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(RnbError, match="exact rows"):
        GradientCapture(model, 2, sketch_dim=2, exact_rows={"2": [0, 1, 2]})


def test_capture_bad_input_is_rnb_error():
    model = _mlp()
    with pytest.raises(RnbError, match="bad layers 'nope'"):
        GradientCapture(model, 2, layers="nope")
    with pytest.raises(RnbError, match="not a linear layer"):
        GradientCapture(model, 2, layers="1")
    cap = GradientCapture(model, 2)
    with pytest.raises(RnbError, match="domain ids"), cap.batch(torch.tensor([0, 5])):
        pass
    with pytest.raises(RnbError, match="already captured"):
        GradientCapture(model, 2)
    cap.remove()
    GradientCapture(model, 2).remove()  # free again after remove()


def test_local_mixer_records_and_refuses_a_used_run_dir(tmp_path):
    mixer = DomainMixer.local(tmp_path, ["a", "b", "c"], lam=3.0)
    sums = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    p = mixer.send_round(sums, np.array([2, 2, 2]), step=5)
    assert mixer.round == 1 and mixer.last_skipped is None and abs(p.sum() - 1) < 1e-12
    assert p[1] > p[2]  # b aligns with both a and c
    state = mixer.state_dict()
    save_state(tmp_path / "m.pt", state)
    assert load_state(tmp_path / "m.pt")["round"] == 1
    mixer.finish(steps=5)
    traj = json.loads((tmp_path / "mixture.json").read_text())["trajectory"]
    assert [t["step"] for t in traj] == [0, 5] and traj[1]["mixture"] == p.tolist()
    with pytest.raises(RnbError, match="already holds a mixer's state"):
        DomainMixer.local(tmp_path, ["a", "b", "c"])
    again = DomainMixer.local(tmp_path, ["a", "b", "c"], resume=True)
    assert again.round == 1 and again.mixture.tolist() == p.tolist()
    again.restore(None, 0)
    assert again.round == 0
    with pytest.raises(RnbError, match="counts has shape"):
        again.send_round(sums, np.array([1, 1]), step=1)


@pytest.mark.parametrize("kw,match", [({"domains": ["a", "a"]}, "distinct"), ({"q": [1.0]}, "q must be"),
                                      ({"floor": 0.6}, "floor"), ({"strategy": "nope"}, "unknown strategy")])
def test_mixer_settings_errors(tmp_path, kw, match):
    args = {"domains": ["a", "b"], **kw}
    with pytest.raises(RnbError, match=match):
        DomainMixer.local(tmp_path / "run", **args)
    assert not (tmp_path / "run").exists()  # nothing written


def test_sampler_shards_and_resumes():
    data = [list(range(0, 10)), list(range(100, 107))]
    s0, s1 = domain_sampler(data, seed=3, rank=0, world=2, chunk_size=2), domain_sampler(data, seed=3, rank=1, world=2)
    seen0 = set(s0.next_batch([0.5, 0.5], 200)[0])
    seen1 = set(s1.next_batch([0.5, 0.5], 200)[0])
    assert seen0.isdisjoint(seen1) and seen0 | seen1 == set(data[0]) | set(data[1])
    state = s0.state_dict()
    a = s0.next_batch([0.2, 0.8], 9)
    s0.load_state_dict(state)
    b = s0.next_batch([0.2, 0.8], 9)
    assert a[0] == b[0] and a[1].tolist() == b[1].tolist()
    with pytest.raises(RnbError, match="domain 1 has no examples"):
        domain_sampler([[1], []])
