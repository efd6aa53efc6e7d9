"""R&B inside the real Hugging Face ``Trainer`` (tiny GPT-2 from a config, CPU, a few steps, no download)."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")  # the Trainer needs it (extra `hf`)
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from rnb_ray.balance.lm import build_model  # noqa: E402
from rnb_ray.balance.mixer import load_state  # noqa: E402
from rnb_ray.errors import RnbError  # noqa: E402
from rnb_ray.integrations.hf import (  # noqa: E402
    DOMAIN_KEY,
    STATE_FILE,
    DomainCollator,
    DomainMixtureDataset,
    RnbCallback,
)  # noqa: E402

VOCAB, SEQ, B = 64, 16, 6


def _dataset(with_domain: bool = True):
    """Three domains with different token statistics: low ids, high ids, a repeating pattern."""
    rng = np.random.default_rng(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": [], "domain": []}
    for d, name in enumerate(["low", "high", "pattern"]):
        for _ in range(40):
            if d == 0:
                ids = rng.integers(1, 20, SEQ)
            elif d == 1:
                ids = rng.integers(40, VOCAB, SEQ)
            else:
                ids = np.tile(rng.integers(1, VOCAB, 4), SEQ // 4)
            n = int(rng.integers(SEQ // 2, SEQ + 1))  # some padding, ignored in the loss
            mask = (np.arange(SEQ) < n).astype(int)
            rows["input_ids"].append((ids * mask).tolist())
            rows["attention_mask"].append(mask.tolist())
            rows["labels"].append(np.where(mask == 1, ids, -100).tolist())
            rows["domain"].append(name)
    if not with_domain:
        del rows["domain"]
    return datasets.Dataset.from_dict(rows)


def _model():
    return build_model(None, vocab_size=VOCAB, seq_len=SEQ, n_layer=1, n_head=2, n_embd=32, pad_token_id=0, seed=0)


class _Recorder(TrainerCallback):
    """Keeps the RnbCallback's round at step 1 (callbacks run in order: this one after it)."""

    def __init__(self, rnb):
        self.rnb, self.first = rnb, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.first = copy.deepcopy(self.rnb.last_round)


def _run(out, strategy="rnb", resume=None, max_steps=6):
    model = _model()
    model0 = copy.deepcopy(model)
    ds = DomainMixtureDataset(_dataset(), domain_column="domain", seed=0)
    rnb = RnbCallback(model, ds, update_every=1, lam=3.0, strategy=strategy)
    rec = _Recorder(rnb)
    batches = []

    class RecordingCollator(DomainCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            batches.append({k: v.clone() for k, v in batch.items()})
            return batch

    args = TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=B, learning_rate=1e-2,
                             lr_scheduler_type="constant", save_strategy="steps", save_steps=4, logging_steps=100,
                             report_to=[], use_cpu=True, ignore_data_skip=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=RecordingCollator(),
                      callbacks=[rnb, rec])
    trainer.train(resume_from_checkpoint=resume)
    rnb.remove()
    return {"model0": model0, "ds": ds, "rnb": rnb, "rec": rec, "batches": batches}


def _independent_head_sums(model, batch, m):
    """Each domain's share of the Trainer's loss gradient w.r.t. the head, by plain autograd, one domain at a
    time (HF's causal LM loss: token cross-entropy summed, divided by the Trainer's count of labels)."""
    ids, am, labels, doms = batch["input_ids"], batch["attention_mask"], batch["labels"], batch[DOMAIN_KEY]
    logits = model(input_ids=ids, attention_mask=am).logits.float()
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, VOCAB), shift_labels.reshape(-1),
                                            ignore_index=-100, reduction="none").view_as(shift_labels)
    n_items = (labels != -100).sum()  # the Trainer's num_items_in_batch: counted before the shift
    out = []
    for d in range(m):
        model.zero_grad()
        (tok[doms == d].sum() / n_items).backward(retain_graph=True)
        out.append(model.lm_head.weight.grad.reshape(-1).clone())
    return torch.stack(out).numpy()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "straight"
    return out, _run(out)


def test_missing_domain_column_is_one_line_error():
    with pytest.raises(RnbError, match="no column 'domain'") as e:
        DomainMixtureDataset(_dataset(with_domain=False), domain_column="domain")
    assert "\n" not in str(e.value) and "input_ids" in str(e.value)


def test_trainer_moves_p_and_records_trajectory(straight):
    out, r = straight
    mixture = json.loads((out / "rnb" / "mixture.json").read_text())
    assert mixture["domains"] == ["high", "low", "pattern"]
    traj = mixture["trajectory"]
    assert [t["step"] for t in traj] == [0, 1, 2, 3, 4, 5, 6]
    assert traj[0]["mixture"] == pytest.approx([1 / 3] * 3)
    assert all(t["skipped"] is None for t in traj[1:])
    final = np.asarray(traj[-1]["mixture"])
    assert np.abs(final - 1 / 3).max() > 0.02  # p moved away from its initial value
    assert np.asarray(r["ds"].p) == pytest.approx(final)  # the dataset draws from the mixer's latest p
    assert (out / "checkpoint-4" / STATE_FILE).is_file()


def test_per_domain_sums_match_autograd_for_one_step(straight):
    _, r = straight
    first = r["rec"].first
    batch = r["batches"][0]  # the first collated batch is step 1's
    assert first["counts"].tolist() == np.bincount(batch[DOMAIN_KEY].numpy(), minlength=3).tolist()
    assert batch[DOMAIN_KEY].tolist() == sorted(batch[DOMAIN_KEY].tolist())  # the collator orders by domain
    expected = _independent_head_sums(r["model0"], batch, 3)
    got = first["sums"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(expected).max() > 1e-4  # a real gradient, not zeros on both sides


def test_resume_restores_sampler_and_mixer(straight, tmp_path):
    out, r = straight
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    saved = load_state(resumed_dir / "checkpoint-4" / STATE_FILE)
    assert saved["consumed"] == 4 * B
    # The checkpoint holds the sampler's state after exactly the 4 steps' examples, not the loader's read-ahead.
    assert saved["sampler"] == r["ds"].state_at(4 * B)
    r2 = _run(resumed_dir, resume=str(resumed_dir / "checkpoint-4"))
    traj = json.loads((resumed_dir / "rnb" / "mixture.json").read_text())["trajectory"]
    straight_traj = json.loads((out / "rnb" / "mixture.json").read_text())["trajectory"]
    assert [t["step"] for t in traj] == [0, 1, 2, 3, 4, 5, 6]  # cut back to step 4, then rounds 5 and 6
    assert traj[:5] == straight_traj[:5]
    assert r2["ds"].yielded >= 6 * B


def test_resume_replays_the_same_examples(tmp_path):
    """With a fixed mixture (stratified), a run resumed at step 4 trains on exactly the straight run's batches."""
    a = _run(tmp_path / "a", strategy="stratified")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = _run(tmp_path / "b", strategy="stratified", resume=str(tmp_path / "b" / "checkpoint-4"))
    for k in ("input_ids", DOMAIN_KEY):
        assert torch.equal(b["batches"][0][k], a["batches"][4][k])
        assert torch.equal(b["batches"][1][k], a["batches"][5][k])


def test_resume_without_ignore_data_skip_is_refused(straight, tmp_path):
    out, _ = straight
    shutil.copytree(out, tmp_path / "c")
    ds = DomainMixtureDataset(_dataset(), seed=0)
    model = _model()
    args = TrainingArguments(str(tmp_path / "c"), max_steps=6, per_device_train_batch_size=B, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=ds.collator(),
                      callbacks=[RnbCallback(model, ds, update_every=1)])
    with pytest.raises(RnbError, match="ignore_data_skip"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-4"))
