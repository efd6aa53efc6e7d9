"""The training run's records in RUN: ``metrics.jsonl``, ``mixture.json`` and ``result.json`` (no Ray).

The mixer actor owns one ``RunRecords`` and is the only writer, so the rows of every worker's run land in
one place in order. The formats are documented in ARCHITECTURE.md ("Training run directory"):

* ``metrics.jsonl`` — one JSON object per logged step, appended as rank 0 sends it. On a restart from a
  checkpoint it is cut back to that checkpoint's step (rewritten atomically), so a resumed run continues
  the same file; a torn last line after a crash is dropped then.
* ``mixture.json`` — the strategy, the final mixture, q, λ, the floor, the options, the trajectory of p
  over the rounds and the last Gram matrix (R&B), written once when the run finishes.
* ``result.json`` — the run's summary, written once when the run finishes.

Every row appended also goes to the run's trackers (``tracking.py``: TensorBoard, MLflow) when it has any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rnb_ray import atomic
from rnb_ray.balance.tracking import Tracking


class RunRecords:
    """Writer of RUN's ``metrics.jsonl``, ``mixture.json`` and ``result.json``."""

    def __init__(self, run_dir: str | Path, tracking: Tracking | None = None):
        self.root = Path(run_dir)
        self.metrics_path = self.root / "metrics.jsonl"
        self.tracking = tracking
        self.last_row: dict[str, Any] | None = None  # the latest row (the driver's progress line polls it)
        self.tracking_error: str | None = None  # a tracker that failed mid-run is dropped; result.json says why

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows logged so far (up to a torn last line, which a crash can leave)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line after a crash
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.last_row = row
        if self.tracking is not None:
            try:
                self.tracking.log(row)
            except Exception as e:  # noqa: BLE001 — a tracker failing mid-run must not end the training
                self.tracking_error = f"{type(e).__name__}: {e}"
                self.tracking = None

    def cut_back(self, step: int | None) -> None:
        """Keep the rows up to ``step`` (a restart from that step's checkpoint); None keeps none (a fresh run)."""
        rows = [] if step is None else [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic.write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_mixture(self, *, strategy: str, domains: list[str], p: list[float], q: list[float], lam: float,
                      floor: float, options: dict[str, Any], trajectory: list[dict[str, Any]],
                      last_gram: list[list[float]] | None) -> dict[str, float]:
        """Write ``mixture.json``; return its ``final`` entry ({domain: p})."""
        final = dict(zip(domains, p, strict=True))
        mixture = {
            "strategy": strategy, "domains": domains, "final": final,
            "q": dict(zip(domains, q, strict=True)), "lam": lam, "floor": floor, "options": options,
            "trajectory": [{"round": t["round"], "step": t["step"], "mixture": t["mixture"],
                            "skipped": t.get("skipped")} for t in trajectory],
            "last_gram": last_gram,
        }
        atomic.write_text(self.root / "mixture.json", json.dumps(mixture, indent=1) + "\n")
        return final

    def write_result(self, summary: dict[str, Any]) -> None:
        if self.tracking_error is not None:
            summary = {**summary, "tracking_error": self.tracking_error}
        atomic.write_text(self.root / "result.json", json.dumps(summary, indent=1) + "\n")
        if self.tracking is not None:
            self.tracking.close()
