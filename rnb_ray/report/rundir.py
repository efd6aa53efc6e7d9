"""Find the files of a run: a pipeline run directory (`rnb run`) or a training run directory (`rnb train`).

Both `rnb report` and `rnb export` accept either; this module is the one place that knows the layouts
(ARCHITECTURE.md, "Training run directory" and "Pipeline run directory").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnb_ray.errors import RnbError
from rnb_ray.outputs import domain_of_dir

# Keys of a training config.json that may name the regrouped corpus it trained on.
_DATA_KEYS = ("data", "input", "train_data", "domains", "regroup", "corpus")


@dataclass(frozen=True)
class RunFiles:
    root: Path
    kind: str  # "pipeline" or "train"
    train: Path  # training run directory (metrics.jsonl, mixture.json)
    regroup: Path | None  # regroup output (domains.json, data/domain-<id>/)
    sweep: Path | None  # sweep output (results.json, best.json)

    @property
    def default_report_dir(self) -> Path:
        return self.root / "report"


def _is_train_dir(p: Path) -> bool:
    return (p / "mixture.json").is_file() or (p / "metrics.jsonl").is_file()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RnbError(f"{path} does not exist", fix="point at a complete run directory") from e
    except json.JSONDecodeError as e:
        raise RnbError(f"{path} is not valid JSON ({e})", fix="re-run the stage that writes it") from e


def _regroup_of_train(train: Path) -> Path | None:
    """The regrouped corpus a training run used, read from its config.json, when it is still there."""
    cfg_path = train / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    for key in _DATA_KEYS:
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if not isinstance(value, str) or not value:
            continue
        p = Path(value)
        if not p.is_absolute():
            p = (train / p) if (train / p).exists() else p
        for cand in (p, p.parent):
            if (cand / "domains.json").is_file():
                return cand
    return None


def resolve_run(path: str | Path) -> RunFiles:
    """Classify ``path`` as a pipeline or training run directory, or raise a clear RnbError."""
    root = Path(path)
    if not root.exists():
        raise RnbError(f"run directory {root} does not exist",
                       fix="pass the --output of `rnb run` or `rnb train`")
    if not root.is_dir():
        raise RnbError(f"{root} is a file, not a run directory",
                       fix="pass the --output directory of `rnb run` or `rnb train`")
    if (root / "pipeline.json").is_file() or _is_train_dir(root / "train"):
        train = root / "train"
        if not _is_train_dir(train):
            raise RnbError(f"pipeline run {root} has no finished training stage (no {train}/mixture.json)",
                           fix=f"finish the run with `rnb run --output {root}` (completed stages are reused)")
        regroup = root / "regroup" if (root / "regroup" / "domains.json").is_file() else _regroup_of_train(train)
        sweep = root / "sweep" if (root / "sweep" / "results.json").is_file() else None
        return RunFiles(root=root, kind="pipeline", train=train, regroup=regroup, sweep=sweep)
    if _is_train_dir(root):
        return RunFiles(root=root, kind="train", train=root, regroup=_regroup_of_train(root), sweep=None)
    raise RnbError(
        f"{root} is not an rnb run directory (no mixture.json or metrics.jsonl, no pipeline.json)",
        fix="pass the --output directory of `rnb run` or `rnb train`",
    )


def read_metrics(train: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts; a torn last line (run killed mid-write) is skipped."""
    path = train / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def final_mixture(run: RunFiles) -> dict[str, float]:
    """Domain name → final weight, in the run's domain order."""
    path = run.train / "mixture.json"
    if not path.is_file():
        raise RnbError(f"{path} does not exist: the training run has not finished",
                       fix="wait for the run to finish, or re-run it (completed steps resume from checkpoints)")
    mix = read_json(path)
    final = mix.get("final") if isinstance(mix, dict) else None
    if not isinstance(final, dict) or not final:
        raise RnbError(f"{path} has no 'final' mixture", fix="re-run the training stage that writes it")
    names = [str(n) for n in mix.get("domains") or list(final)]
    return {n: float(final[n]) for n in names if n in final}


def domain_dirs(run: RunFiles) -> dict[str, Path]:
    """Domain name → parquet directory of that domain in the regrouped corpus (``domain-<id>``, or the older
    hive-style ``domain=<id>``)."""
    if run.regroup is None:
        return {}
    data = run.regroup / "data"
    out = {}
    if data.is_dir():
        for d in sorted(data.iterdir()):
            name = domain_of_dir(d.name) if d.is_dir() else None
            if name is not None:
                out[name] = d.resolve()
    return out
