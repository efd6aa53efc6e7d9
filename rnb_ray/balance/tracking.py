"""Experiment tracking: every ``metrics.jsonl`` row also as TensorBoard scalars and/or MLflow metrics (no Ray).

``rnb train --track tensorboard,mlflow [--tracking-dir DIR]`` (default DIR: ``RUN/tracking``):

* ``tensorboard`` — event files under ``DIR/tensorboard/`` (tensorboardX, else ``torch.utils.tensorboard``);
  ``tensorboard --logdir DIR/tensorboard``.
* ``mlflow`` — a local MLflow file store ``DIR/mlruns`` (works offline; experiment ``rnb``, one MLflow run per
  training run, its id kept in ``DIR/mlflow-run.json`` so ``--resume`` continues it). MLflow 3 keeps the file
  store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for this store;
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri DIR/mlruns`` shows it.

Scalars, at each row's ``step`` (names shared by both; no name is another's prefix, which MLflow's file store
needs): ``loss/train``, ``loss/eval``, ``eval_loss/<domain>``, ``throughput/tokens_per_s``, ``lr``,
``mixture/<domain>`` (every domain's weight). The mixer — the one writer
of ``metrics.jsonl`` (``records.py``) — owns the trackers, so they see the rows in order, once.
Installed with the ``track`` extra (``pip install rnb-ray[track]``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from rnb_ray.balance.costs import step_seconds
from rnb_ray.errors import RnbError

TRACKERS = ("tensorboard", "mlflow")


def parse_track(track: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` → ``("tensorboard", "mlflow")``; "" / None / "none" → (); unknown names refused."""
    if track is None:
        return ()
    items = track.split(",") if isinstance(track, str) else list(track)
    names = tuple(dict.fromkeys(t.strip().lower() for t in items if t.strip() and t.strip().lower() != "none"))
    unknown = [t for t in names if t not in TRACKERS]
    if unknown:
        raise RnbError(f"unknown tracker {', '.join(map(repr, unknown))}", where="--track",
                       fix=f"use a comma-separated subset of {', '.join(TRACKERS)}")
    return names


def tracking_dir(run_dir: str | Path, given: str | None) -> Path:
    return Path(given).expanduser().absolute() if given else Path(run_dir).absolute() / "tracking"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_tracking(track: str | None, given_dir: str | None, run_dir: str | Path) -> tuple[tuple[str, ...], Path | None]:
    """Before any Ray work: known names, their packages installed, the directory writable (nothing created)."""
    names = parse_track(track)
    if not names:
        return names, None
    if "tensorboard" in names and not (_has("tensorboardX") or _has("torch.utils.tensorboard") and _has("tensorboard")):
        raise RnbError("--track tensorboard needs tensorboardX (or tensorboard)", where="--track",
                       fix="pip install 'rnb-ray[track]' (or tensorboardX), or drop tensorboard from --track")
    if "mlflow" in names and not _has("mlflow"):
        raise RnbError("--track mlflow needs mlflow (mlflow-skinny is enough)", where="--track",
                       fix="pip install 'rnb-ray[track]' (or mlflow-skinny), or drop mlflow from --track")
    root = tracking_dir(run_dir, given_dir)
    existing = root
    while not existing.exists() and existing != existing.parent:  # nothing is created here: a check only
        existing = existing.parent
    why = None
    if not existing.is_dir():
        why = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"no write permission on {existing}"
    if why is not None:
        raise RnbError(f"tracking directory {root} is not writable ({why})", where="--tracking-dir",
                       fix="pass a --tracking-dir this user can write, or fix its permissions")
    return names, root


def scalars(row: dict[str, Any], domains: list[str], tokens_per_s: float | None) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` row (None / missing values left out)."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if value is not None:
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                pass

    put("loss/train", row.get("train_loss"))
    put("loss/eval", row.get("eval_loss"))
    for d, loss in (row.get("eval_loss_by_domain") or {}).items():
        put(f"eval_loss/{d}", loss)
    put("throughput/tokens_per_s", tokens_per_s)
    put("lr", row.get("lr"))
    for d, w in zip(domains, row.get("mixture") or [], strict=False):
        put(f"mixture/{d}", w)
    return out


def tokens_per_s(prev: dict[str, Any] | None, row: dict[str, Any]) -> float | None:
    """Training throughput: Δtokens over Δ(rank 0's step time: train + capture + round reduction + mixer wait) since ``prev``
    (the average since step 0 without one; the counters are cumulative)."""

    dt = step_seconds(row) - (step_seconds(prev) if prev is not None else 0.0)
    dtok = float(row.get("tokens") or 0) - (float(prev.get("tokens") or 0) if prev is not None else 0.0)
    return dtok / dt if dt > 0 and dtok >= 0 else None


def mlflow_client(root: str | Path) -> Any:
    """An ``MlflowClient`` on the file store ``root/mlruns`` (what ``--track mlflow`` writes), to read it back."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the offline file store is opt-in
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(Path(root) / "mlruns").as_uri())


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class Tracking:
    """The run's trackers; ``log(row)`` for every ``metrics.jsonl`` row, ``close()`` at the end."""

    def __init__(self, names: tuple[str, ...], root: Path, domains: list[str], run_name: str,
                 params: dict[str, Any] | None = None):
        self.names, self.root, self.domains = names, root, domains
        self.prev: dict[str, Any] | None = None
        self.tb = None
        self.mlflow = None
        self.mlflow_run: str | None = None
        root.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in names:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # torch's own writer (needs the tensorboard package)
                from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(logdir=str(root / "tensorboard")) if _has("tensorboardX") else \
                SummaryWriter(log_dir=str(root / "tensorboard"))
        if "mlflow" in names:
            from mlflow.entities import Param

            self.mlflow = mlflow_client(root)
            id_file = root / "mlflow-run.json"
            if id_file.is_file():  # a resumed run (or a restarted mixer) continues its MLflow run
                self.mlflow_run = json.loads(id_file.read_text(encoding="utf-8"))["run_id"]
            else:
                exp = self.mlflow.get_experiment_by_name("rnb")
                exp_id = exp.experiment_id if exp is not None else self.mlflow.create_experiment("rnb")
                self.mlflow_run = self.mlflow.create_run(exp_id, run_name=run_name).info.run_id
                self.mlflow.log_batch(self.mlflow_run, params=[Param(k, str(v)[:500])
                                                               for k, v in sorted((params or {}).items())])
                id_file.write_text(json.dumps({"run_id": self.mlflow_run}) + "\n", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        values = scalars(row, self.domains, tokens_per_s(self.prev, row))
        self.prev = row
        if self.tb is not None:
            for name, v in values.items():
                self.tb.add_scalar(name, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[Metric(_MLFLOW_KEY.sub("_", k), v, now, step)
                                                            for k, v in values.items()])

    def close(self, status: str = "FINISHED") -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, status=status)
            self.mlflow = None
