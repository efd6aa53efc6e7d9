"""What a Balance run decides once, before any worker starts: the data plan, the mixer's spec and what
the strategy needs measured. The driver computes it and hands the same ``RunSetup`` to every worker."""

from __future__ import annotations

from dataclasses import dataclass

from rnb_ray.balance.config import TrainConfig
from rnb_ray.balance.mixer import MixerSpec, build_strategy
from rnb_ray.balance.plan import Plan, prepare_plan
from rnb_ray.balance.strategies.base import Strategy
from rnb_ray.balance.token_plan import TokenPlan, is_token_data, prepare_token_plan
from rnb_ray.balance.tracking import parse_track, tracking_dir


@dataclass(frozen=True)
class Needs:
    """The signals a strategy asks the workers for (``Strategy.needs_*``); anything else is not computed."""

    train_grads: bool  # per-domain gradients from the ordinary backward
    eval_grad: bool  # an extra forward+backward on evaluation data each round
    eval_losses: bool  # per-domain evaluation losses each round

    @classmethod
    def of(cls, strategy: Strategy) -> Needs:
        return cls(train_grads=bool(strategy.needs_train_grads), eval_grad=bool(strategy.needs_eval_grad),
                   eval_losses=bool(strategy.needs_eval_losses))

    @property
    def capture(self) -> bool:
        """Whether workers hook the captured layers at all."""
        return self.train_grads or self.eval_grad


def make_spec(cfg: TrainConfig, plan: Plan | TokenPlan, num_workers: int) -> MixerSpec:
    """The mixer's settings. λ comes from ``cfg.lam`` alone (``TrainConfig.validate`` refuses a ``lam`` in
    ``strategy_options``): the rnb strategy reads it from its options, ``MixerSpec.lam`` records it in
    ``mixture.json`` — the same value, so the record is the λ used."""
    options = dict(cfg.strategy_options or {})
    if cfg.strategy == "rnb":
        options["lam"] = cfg.lam
    if cfg.strategy == "static":
        assert plan.static_weights is not None
        options["weights"] = plan.static_weights.tolist()
    return MixerSpec(run_dir=str(cfg.run_dir), domains=plan.domains, strategy=cfg.strategy, options=options,
                     sizes=plan.sizes.tolist(), q=plan.q.tolist(), floor=cfg.floor, num_workers=num_workers,
                     lam=cfg.lam, debug_dump_rounds=cfg.debug_dump_rounds, track=parse_track(cfg.track),
                     tracking_dir=str(tracking_dir(cfg.run_dir, cfg.tracking_dir)) if cfg.track else None)


@dataclass(frozen=True)
class RunSetup:
    cfg: TrainConfig
    plan: Plan | TokenPlan
    spec: MixerSpec
    needs: Needs


def setup_run(cfg: TrainConfig, num_workers: int, plan: Plan | TokenPlan | None = None) -> RunSetup:
    """Plan the data (unless given) and build the strategy once: bad options fail here, before Ray work.
    Token shards (``rnb tokenize`` output) get the packing plan, anything else the raw-text plan."""
    if plan is None:
        plan = prepare_token_plan(cfg) if is_token_data(cfg.data) else prepare_plan(cfg)
    spec = make_spec(cfg, plan, num_workers)
    return RunSetup(cfg=cfg, plan=plan, spec=spec, needs=Needs.of(build_strategy(spec)))
