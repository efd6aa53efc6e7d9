"""What a training run spent on choosing its mixture, from a ``result.json`` summary or a ``metrics.jsonl``
row (pure: no Ray, no IO). One definition for the CLI, the report, the trackers and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Rank 0's time in a step: training, the capture's own work, the workers' round reduction, the mixer wait.
STEP_SECONDS = ("seconds_train", "seconds_capture", "seconds_reduce", "seconds_mixer")
#: Time spent beyond training: capture, round reduction, mixer round trip and extra evaluation passes.
MIXING_SECONDS = ("seconds_capture", "seconds_reduce", "seconds_mixer", "extra_seconds")


def _sum(row: Mapping[str, Any], keys: tuple[str, ...]) -> float:
    return sum(float(row.get(k) or 0.0) for k in keys)


def step_seconds(row: Mapping[str, Any]) -> float:
    return _sum(row, STEP_SECONDS)


def mixing_seconds(row: Mapping[str, Any]) -> float:
    return _sum(row, MIXING_SECONDS)
