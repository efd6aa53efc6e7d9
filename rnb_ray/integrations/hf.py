"""R&B in a Hugging Face ``Trainer``: a dataset wrapper that draws examples by domain from the current
mixture p, and a ``TrainerCallback`` that runs the mixing rounds (a thin layer over ``rnb_ray.api``).

* ``DomainMixtureDataset(ds, domain_column="domain")`` — a ``torch`` ``IterableDataset`` over a
  ``datasets.Dataset`` with a domain column (tokenized beforehand, as usual for the ``Trainer``): endless,
  each example's domain drawn from p, then that domain's next example (``api.domain_sampler``). Pair it with
  its collator, ``dataset.collator(base)``, which carries each example's domain to the model.
* ``RnbCallback(model, dataset, update_every=K)`` — hooks ``GradientCapture`` on the model's layers (the head
  by default; ``layers="last_block"`` for the last block) and, every K optimizer steps, sends the round's
  per-domain sums and counts to the mixer and gives the dataset the new p. At each checkpoint it writes
  ``rnb_state.pt`` (sampler, mixer) into the checkpoint directory, and reads it back on resume; at the end
  the mixer writes ``mixture.json`` (the trajectory of p) into ``run_dir`` (default ``<output_dir>/rnb``).

Use::

    from transformers import Trainer, TrainingArguments
    from rnb_ray.integrations.hf import DomainMixtureDataset, RnbCallback

    train = DomainMixtureDataset(tokenized, domain_column="domain", seed=0)
    rnb = RnbCallback(model, train, update_every=10, lam=3.0)
    args = TrainingArguments("out", max_steps=1000, ignore_data_skip=True)  # the sampler resumes the data
    Trainer(model=model, args=args, train_dataset=train, data_collator=train.collator(collator),
            callbacks=[rnb]).train()

One process (``dataloader_num_workers=0``: the dataset lives where the callback updates p). The captured
sums are of the ``Trainer``'s own loss (a mean over tokens), each domain's share; R&B's update depends on
their directions only, so the loss's scale does not change p. For several workers use the same API inside a
Ray Train ``train_func`` (``examples/ray_train_rnb.py``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from rnb_ray.api import DomainMixer, GradientCapture, domain_names, domain_sampler, load_state, save_state
from rnb_ray.errors import RnbError

__all__ = ["DOMAIN_KEY", "STATE_FILE", "DomainCollator", "DomainMixtureDataset", "RnbCallback"]

DOMAIN_KEY = "rnb_domain"  # the batch key the collator adds and the model's forward hook takes out
STATE_FILE = "rnb_state.pt"  # in each Trainer checkpoint directory


class _Rows:
    """One domain's rows of a ``datasets.Dataset`` (indexable; each read drops the domain column)."""

    def __init__(self, ds: Any, rows: np.ndarray, columns: list[str]):
        self.ds, self.rows, self.columns = ds, rows, columns

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.ds[int(self.rows[i])]
        return {c: row[c] for c in self.columns}


class DomainMixtureDataset(torch.utils.data.IterableDataset):
    """Endless examples of ``ds`` whose domains are drawn from the current mixture (see the module doc).

    ``domain_column``: the column naming each row's domain (any values; names as ``api.domain_names``).
    ``columns``: the columns handed to the collator (default: all but the domain column). Yields
    ``(domain id, example)`` pairs, which ``collator()`` turns into a batch.
    """

    def __init__(self, ds: Any, domain_column: str = "domain", *, columns: list[str] | None = None,
                 seed: int = 0, chunk_size: int = 1024):
        names = list(getattr(ds, "column_names", None) or [])
        if domain_column not in names:
            raise RnbError(f"the dataset has no column {domain_column!r} (its columns: {', '.join(names) or 'none'})",
                           where="DomainMixtureDataset(domain_column=...)",
                           fix="name the column that holds each row's domain, or add one (ds.add_column)")
        values = ds[domain_column]
        self.domains = domain_names(values)
        index = {name: i for i, name in enumerate(self.domains)}
        ids = np.fromiter((index[str(v)] for v in values), dtype=np.int64, count=len(values))
        self.columns = [c for c in names if c != domain_column] if columns is None else list(columns)
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise RnbError(f"the dataset has no column(s) {missing}", where="DomainMixtureDataset(columns=...)",
                           fix=f"choose among {names}")
        per_domain = [_Rows(ds, np.flatnonzero(ids == d), self.columns) for d in range(len(self.domains))]
        self.sizes = [len(r) for r in per_domain]
        self.sampler = domain_sampler(per_domain, seed=seed, chunk_size=chunk_size)
        self.p = np.full(len(self.domains), 1.0 / len(self.domains))
        self.yielded = 0  # examples drawn so far
        self.snapshot_every = 1  # the callback sets the batch size: sampler states are kept at batch starts
        self._snapshots: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()

    def set_mixture(self, p: Any) -> None:
        """The mixture the next draws use."""
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (len(self.domains),):
            raise RnbError(f"mixture of {p.shape} for {len(self.domains)} domains", where="set_mixture",
                           fix="one weight per domain, in dataset.domains order")
        self.p = p

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        while True:
            if self.yielded % self.snapshot_every == 0:
                self._snapshots[self.yielded] = self.sampler.state_dict()
                while len(self._snapshots) > 64:  # the loader fetches a batch or two ahead, not more
                    self._snapshots.popitem(last=False)
            examples, doms = self.sampler.next_batch(self.p, 1)
            self.yielded += 1
            yield int(doms[0]), examples[0]

    def state_at(self, consumed: int) -> dict[str, Any]:
        """The sampler's state after ``consumed`` examples (what training used: the loader reads ahead)."""
        if consumed == self.yielded:
            return self.sampler.state_dict()
        if consumed not in self._snapshots:
            raise RnbError(f"no sampler state kept at example {consumed} (drawn: {self.yielded})",
                           where="DomainMixtureDataset", fix="checkpoint at batch boundaries (steps)")
        return self._snapshots[consumed]

    def load_state(self, state: dict[str, Any], consumed: int) -> None:
        self.sampler.load_state_dict(state)
        self.yielded = consumed
        self._snapshots.clear()

    def collator(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None) -> DomainCollator:
        """The batch collator to give the ``Trainer``: ``base`` (default ``default_data_collator``) on the
        examples, ordered by domain, plus their domain ids under ``DOMAIN_KEY``."""
        return DomainCollator(base)


class DomainCollator:
    """Collates ``(domain, example)`` pairs: examples ordered by domain (so capture groups them without a
    copy), ``base`` on the examples, their domain ids added as ``batch["rnb_domain"]``."""

    def __init__(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None):
        if base is None:
            from transformers import default_data_collator

            base = default_data_collator
        self.base = base

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        if not all(isinstance(f, tuple) and len(f) == 2 for f in features):
            raise RnbError("DomainCollator got examples that are not (domain, example) pairs",
                           where="data_collator", fix="use it with a DomainMixtureDataset as train_dataset")
        features = sorted(features, key=lambda f: f[0])
        batch = dict(self.base([f[1] for f in features]))
        batch[DOMAIN_KEY] = torch.tensor([f[0] for f in features], dtype=torch.long)
        return batch


def _grad_positions(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """(B, T) positions of a causal LM batch that carry gradient (a label at the next position)."""
    labels, am, ids = kwargs.get("labels"), kwargs.get("attention_mask"), kwargs.get("input_ids")
    ref = labels if labels is not None else am if am is not None else ids
    if ref is None or ref.dim() != 2:
        return None
    mask = torch.zeros(ref.shape, dtype=torch.bool)
    if labels is not None:
        mask[:, :-1] = (labels[:, 1:] != -100).cpu()
    elif am is not None:
        mask[:, :-1] = am[:, 1:].bool().cpu()
    else:
        mask[:, :-1] = True
    return mask


def _shape_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """An all-true (B, T) mask of the batch's shape (no device transfer)."""
    ref = next((kwargs[k] for k in ("input_ids", "attention_mask", "labels") if kwargs.get(k) is not None), None)
    return None if ref is None or ref.dim() != 2 else torch.ones(tuple(ref.shape), dtype=torch.bool)


class RnbCallback(TrainerCallback):
    """Runs R&B's rounds inside ``Trainer.train()`` (see the module docstring).

    ``model``: the model given to the ``Trainer`` (before it wraps it). ``dataset``: the
    ``DomainMixtureDataset`` given as ``train_dataset``. ``update_every``: optimizer steps per round (K).
    ``layers``/``sketch_dim``/``sketch_kind``: what ``GradientCapture`` captures. ``mixer``: a ``DomainMixer`` (default: one in
    this process, ``strategy``/``lam``/``floor``/``q``, writing into ``run_dir``, default
    ``<output_dir>/rnb``). ``last_round`` holds the last round's ``{"step", "sums", "counts", "mixture"}``.
    """

    def __init__(self, model: nn.Module, dataset: DomainMixtureDataset, *, update_every: int = 10,
                 layers: str = "head", sketch_dim: int = 0, sketch_kind: str = "rowhash",
                 mixer: DomainMixer | None = None,
                 run_dir: str | Path | None = None, strategy: str = "rnb", lam: float = 3.0,
                 floor: float = 0.0, q: list[float] | None = None, seed: int = 0):
        if not isinstance(dataset, DomainMixtureDataset):
            raise RnbError(f"dataset is a {type(dataset).__name__}", where="RnbCallback(dataset=...)",
                           fix="wrap the data in DomainMixtureDataset and give the same object to the Trainer")
        if update_every < 1:
            raise RnbError(f"update_every is {update_every}", where="RnbCallback", fix="use K >= 1")
        self.dataset, self.update_every = dataset, int(update_every)
        self.capture = GradientCapture(model, len(dataset.domains), layers, sketch_dim=sketch_dim,
                                       sketch_kind=sketch_kind, seed=seed)
        self._sketch = sketch_dim > 0
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.mixer = mixer
        self._mixer_settings = {"strategy": strategy, "lam": lam, "floor": floor, "q": q}
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.last_round: dict[str, Any] | None = None
        self._examples_per_step = 1

    # ---------------------------------------------------------------- the model's forward
    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        domains = kwargs.pop(DOMAIN_KEY, None)
        training = module.training and torch.is_grad_enabled()
        if domains is not None and training:
            # Which positions carry gradient matters only to sketches; exact sums need the (B, T) shape.
            positions = _grad_positions(kwargs) if self._sketch else _shape_mask(kwargs)
            self.capture.begin(domains, positions, scale=1.0)
        else:
            self.capture.end()
            if training:
                raise RnbError(f"a training batch without {DOMAIN_KEY!r} (its keys: {', '.join(kwargs)})",
                               where="Trainer(data_collator=...)", fix="pass data_collator=dataset.collator(...)")
        return args, kwargs

    # ---------------------------------------------------------------- Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.world_size > 1:
            raise RnbError(f"RnbCallback runs in one process; this Trainer has {args.world_size}",
                           where="TrainingArguments", fix="train on one device, or use the API in a Ray Train "
                           "train_func for several workers (examples/ray_train_rnb.py)")
        if args.dataloader_num_workers:
            raise RnbError(f"dataloader_num_workers is {args.dataloader_num_workers}",
                           where="TrainingArguments", fix="use dataloader_num_workers=0 with RnbCallback (the "
                           "dataset must live in the process whose callback updates p)")
        loader = kwargs.get("train_dataloader")
        collate = getattr(loader, "collate_fn", None)
        if collate is not None and not isinstance(getattr(collate, "data_collator", collate), DomainCollator):
            raise RnbError("the Trainer's data_collator is not a DomainCollator", where="Trainer(data_collator=...)",
                           fix="pass data_collator=dataset.collator(your_collator)")
        self._examples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.dataset.snapshot_every = args.per_device_train_batch_size
        resumed = state.global_step > 0
        if resumed and not args.ignore_data_skip:
            raise RnbError("resuming with ignore_data_skip=False would replay batches the sampler already drew",
                           where="TrainingArguments", fix="set ignore_data_skip=True (the sampler resumes the data)")
        if self.run_dir is None:
            self.run_dir = Path(args.output_dir) / "rnb"
        if self.mixer is None:
            self.mixer = DomainMixer.local(self.run_dir, self.dataset.domains, sizes=self.dataset.sizes,
                                           resume=resumed, **self._mixer_settings)
        if resumed:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise RnbError(f"the checkpoint has no {STATE_FILE}", where=str(path.parent),
                               fix="resume from a checkpoint written with RnbCallback")
            saved = load_state(path)
            self.dataset.load_state(saved["sampler"], int(saved["consumed"]))
            self.mixer.restore(saved["mixer"], state.global_step)
        self.dataset.set_mixture(self.mixer.mixture)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.update_every:
            return
        assert self.mixer is not None
        sums, counts = self.capture.take()
        p = self.mixer.send_round(sums, counts, step=state.global_step)
        self.dataset.set_mixture(p)
        self.last_round = {"step": state.global_step, "sums": sums, "counts": counts, "mixture": p}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.mixer is not None
        consumed = state.global_step * self._examples_per_step
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            save_state(ckpt / STATE_FILE, {"sampler": self.dataset.state_at(consumed), "consumed": consumed,
                                           "mixer": self.mixer.state_dict(), "step": state.global_step})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.mixer is not None
        self.mixer.finish(steps=state.global_step)

    def remove(self) -> None:
        """Unhook the model (capture and the forward hook)."""
        self._hook.remove()
        self.capture.remove()
