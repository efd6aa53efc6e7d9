"""The training loop's components alone, without Ray: the checkpoint format, the in-process runtime's
checkpoints, the step function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnb_ray.balance import checkpoint
from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.lm import build_model, load_tokenizer, per_example_loss, tokenize
from rnb_ray.balance.runtime import LocalRuntime
from rnb_ray.balance.step import Batch, optimizer_for, train_step
from rnb_ray.errors import RnbError


def _tiny():
    tok = load_tokenizer(None, "byte")
    model = build_model(None, vocab_size=len(tok), seq_len=16, n_layer=1, n_head=2, n_embd=16,
                        pad_token_id=tok.pad_token_id, seed=0)
    return tok, model


def test_checkpoint_files_and_round_trip(tmp_path):
    _, model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    workers = [checkpoint.WorkerState(sampler={"rng": r}, rng=torch.get_rng_state(), totals={"tokens": 3.0 + r})
               for r in range(2)]
    checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=20, p=np.array([0.25, 0.75]),
                    pending_round=3, workers=workers, mixer_state={"round": 4, "p": [0.25, 0.75]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixer.pt", "model.pt", "optimizer.pt", "trainer.pt"]
    state = torch.load(tmp_path / "trainer.pt", weights_only=True)
    assert sorted(state) == ["estimates", "p", "pending_round", "samplers", "scheduler", "step", "torch_rng", "totals",
                             "world"]
    assert state["world"] == 2 and state["p"] == [0.25, 0.75] and state["totals"][1] == {"tokens": 4.0}

    _, fresh = _tiny()
    with torch.no_grad():
        for prm in fresh.parameters():
            prm.add_(1.0)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    r = checkpoint.load(tmp_path, model=fresh, optimizer=fresh_opt, rank=1, world=2, device=torch.device("cpu"))
    assert r.step == 20 and r.pending_round == 3 and r.worker.sampler == {"rng": 1} and r.mixer["round"] == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    with pytest.raises(RnbError, match="written by 2 workers, this run has 1"):
        checkpoint.load(tmp_path, model=fresh, optimizer=fresh_opt, rank=0, world=1, device=torch.device("cpu"))


def test_local_runtime_keeps_the_two_newest_checkpoints(tmp_path):
    class NoMixer:
        pass

    rt = LocalRuntime(tmp_path / "run", NoMixer())  # type: ignore[arg-type]
    with rt.latest_checkpoint() as ck:
        assert ck is None
    for step in (5, 10, 15):
        src = tmp_path / f"src{step}"
        src.mkdir()
        (src / "model.pt").write_text(str(step))
        rt.save_checkpoint(src, step)
    root = tmp_path / "run" / "checkpoints" / "local"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_000000010", "checkpoint_000000015"]
    with rt.latest_checkpoint() as ck:
        assert ck == root / "checkpoint_000000015" and (ck / "model.pt").read_text() == "15"
    assert checkpoint.latest(tmp_path / "run") == root / "checkpoint_000000015"


def test_train_step_is_one_clipped_adamw_step_on_the_mean_loss():
    tok, model = _tiny()
    _, ref = _tiny()
    cfg = TrainConfig(data="x", lr=1e-2, warmup_steps=0, steps=10)
    opt, sched = optimizer_for(model, cfg)
    ref_opt, _ = optimizer_for(ref, cfg)
    ids, am = tokenize(tok, ["def f(x): return x", "a longer docstring than sixteen bytes"], 16)
    batch = Batch(ids, am, np.array([0, 1]))
    loss = train_step(model, opt, sched, batch)
    ref_loss = per_example_loss(ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                batch.input_ids, batch.attention_mask).mean()
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    assert float(loss) == pytest.approx(float(ref_loss.detach()))
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))
    assert sched.last_epoch == 1 and all(p.grad is None for p in model.parameters())


def test_lam_has_one_source(tmp_path):
    """λ is --lam: a lam inside --strategy-options is refused (mixture.json would record another λ), and the
    mixer spec carries the same λ the rnb strategy reads."""
    from rnb_ray.balance.run_setup import make_spec

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x", "domain": 1}\n')
    cfg = TrainConfig(data=str(data), output=str(tmp_path / "run"), strategy_options='{"lam": 5}')
    with pytest.raises(RnbError, match="lam.*--lam 5"):
        cfg.validate()

    class _Plan:
        domains, static_weights = ["a", "b"], None
        sizes, q = np.array([1, 1]), np.array([0.5, 0.5])

    ok = TrainConfig(data=str(data), output=str(tmp_path / "run"), lam=7.0).validate()
    spec = make_spec(ok, _Plan(), num_workers=1)  # type: ignore[arg-type]
    assert spec.lam == spec.options["lam"] == 7.0
