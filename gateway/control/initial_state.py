"""The state a gateway starts with: the configured pools and routes, or one planner-chosen pool per class.

The planner's default, before any tuning: a class that minimises latency gets the largest feasible TP in
its GPU share, as one replica; a class that maximises throughput gets the smallest feasible TP, with as
many replicas as its share holds (DESIGN.md: 4xTP2 for heavy concurrency, 2xTP4 or 1xTP8 for latency).
A class's share is its ``gpu_budget``, or an even split of the budget among classes without one.
"""

from __future__ import annotations

from gateway.config import PoolConfig, TpgateConfig
from gateway.control.state import Capacity, DesiredState, PoolSpec, StateError
from gateway.engines.base import EngineSpec
from gateway.planner import DEFAULT_KNOBS, EngineKnobs, plan


def engine_spec(config: TpgateConfig, tp: int, knobs: EngineKnobs) -> EngineSpec:
    engine = config.engine
    return EngineSpec(
        engine=engine.kind,
        model=engine.model_path or config.model,
        served_model_name=config.model_name,
        gpu=config.gpu.lower(),
        tp=tp,
        knobs=knobs,
        time_scale=engine.time_scale,
        deviation_file=engine.deviation_file,
        extra_args=tuple(engine.extra_args),
    )


def pool_spec(config: TpgateConfig, pool_id: str, pool: PoolConfig) -> PoolSpec:
    return PoolSpec(id=pool_id, engine=engine_spec(config, pool.tp, pool.knobs), replicas=pool.replicas)


def class_budgets(config: TpgateConfig) -> dict[str, int]:
    """GPUs each class may use: its own ``gpu_budget``, or an even share of what the others leave."""
    fixed = {name: c.gpu_budget for name, c in config.classes.items() if c.gpu_budget is not None}
    open_classes = [name for name in config.classes if name not in fixed]
    left = config.gpus - sum(fixed.values())
    if open_classes and left < len(open_classes):
        raise StateError(f"{left} GPUs left for {len(open_classes)} classes without a gpu_budget")
    share = left // len(open_classes) if open_classes else 0
    return {name: fixed.get(name, share) for name in config.classes}


def initial_state(config: TpgateConfig, capacity: Capacity) -> DesiredState:
    """The configured pools and routes, or the planner's default pool per class."""
    if config.pools:
        pools = {pool_id: pool_spec(config, pool_id, pool) for pool_id, pool in config.pools.items()}
        return DesiredState(pools=pools, routes={name: dict(w) for name, w in config.routes.items()})
    state = DesiredState()
    for name, budget in class_budgets(config).items():
        pool = planner_pool(config, capacity, name, budget)
        state = state.with_pool(pool).with_route(name, {pool.id: 1.0})
    return state


def planner_pool(config: TpgateConfig, capacity: Capacity, class_name: str, budget: int) -> PoolSpec:
    knobs = DEFAULT_KNOBS
    verdicts = [
        v for v in plan(capacity.model, capacity.gpu, gpus=budget, gpus_per_node=min(budget, capacity.gpus_per_node),
                        knobs=knobs)
        if v.feasible
    ]
    if not verdicts:
        raise StateError(f"class {class_name!r}: no TP size fits its {budget} GPUs (see `tpgate plan`)")
    if config.classes[class_name].objectives[0] == "min_e2e_p99":
        tp, replicas = verdicts[-1].tp, 1
    else:
        tp, replicas = verdicts[0].tp, verdicts[0].max_replicas
    pool_id = f"{class_name}-tp{tp}".lower().replace("_", "-")
    return PoolSpec(id=pool_id, engine=engine_spec(config, tp, knobs), replicas=replicas)
