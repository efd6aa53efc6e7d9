"""The progress line of a training run on the console (no Ray): step/steps, losses, tokens/s, ETA, top of p.

``train()`` blocks in ``TorchTrainer.fit()`` while the workers run; a :class:`ProgressPrinter` thread on the
driver polls the mixer actor for the latest ``metrics.jsonl`` row (``Mixer.latest``) and prints it — one
line rewritten in place on a terminal (at most once a second), a plain line per new row otherwise (a log
file, a CI job). It goes to stderr, so stdout keeps only the final JSON of ``rnb train``. ``--quiet`` turns it
off. Polling the driver-side actor works whatever Ray does with worker output (``log_to_driver`` is off
by default so Ray's own worker logs do not flood the console).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from rnb_ray.balance.tracking import tokens_per_s


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _num(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{float(x):.3f}"


def format_progress(row: dict[str, Any], *, steps: int, domains: list[str], tok_s: float | None,
                    eta_s: float | None, top: int = 3, last_eval: float | None = None) -> str:
    """One line: ``step 40/200 | train 3.214 | eval 3.301 | 1,234 tok/s | ETA 2m10s | p 3:0.41 0:0.22 7:0.12``."""
    mixture = list(row.get("mixture") or [])
    order = sorted(range(len(mixture)), key=lambda i: -mixture[i])[:top]
    names = [domains[i] if i < len(domains) else str(i) for i in order]
    parts = [f"step {row.get('step', 0)}/{steps}", f"train {_num(row.get('train_loss'))}",
             f"eval {_num(row.get('eval_loss') if row.get('eval_loss') is not None else last_eval)}",
             f"{tok_s:,.0f} tok/s" if tok_s is not None else "- tok/s",
             f"ETA {_duration(eta_s)}" if eta_s is not None else "ETA -"]
    if order:
        parts.append("p " + " ".join(f"{n}:{mixture[i]:.2f}" for n, i in zip(names, order, strict=True)))
    return " | ".join(parts)


class ProgressPrinter:
    """Poll ``latest()`` (the newest metrics row, or None) every ``interval`` seconds and print progress."""

    def __init__(self, latest: Callable[[], dict[str, Any] | None], *, steps: int, domains: list[str],
                 stream: TextIO | None = None, interval: float | None = None, prefix: str = "rnb train: "):
        self.latest, self.steps, self.domains = latest, steps, domains
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (1.0 if self.tty else 2.0)
        self.prefix = prefix
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines: list[str] = []  # what was printed (tests, and the final line)
        self._prev: dict[str, Any] | None = None
        self._first: tuple[float, int] | None = None  # (time, step) of the first row seen: the ETA's origin
        self._last_eval: float | None = None
        self._width = 0

    def poll_once(self) -> str | None:
        """Fetch the latest row; print and return its line if it is new (errors polling are not fatal)."""
        try:
            row = self.latest()
        except Exception:  # noqa: BLE001 — a slow or restarting mixer: try again at the next tick
            return None
        if not row or (self._prev is not None and row.get("step") == self._prev.get("step")):
            return None
        now, step = time.monotonic(), int(row.get("step", 0))
        if self._first is None or step < self._first[1]:  # first row, or a restart from a checkpoint
            self._first, self._prev = (now, step), None
        eta = None
        t0, s0 = self._first
        if step > s0 and now > t0:
            eta = (self.steps - step) * (now - t0) / (step - s0)
        if row.get("eval_loss") is not None:
            self._last_eval = row["eval_loss"]
        line = format_progress(row, steps=self.steps, domains=self.domains, tok_s=tokens_per_s(self._prev, row),
                               eta_s=eta, last_eval=self._last_eval)
        self._prev = row
        self._emit(line)
        return line

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        text = self.prefix + line
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll_once()

    def start(self) -> ProgressPrinter:
        self._thread = threading.Thread(target=self._run, name="rnb-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling; print the last row if it was not shown yet, and end the in-place line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.poll_once()
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
