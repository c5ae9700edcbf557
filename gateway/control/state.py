"""Desired serving state — engine pools and per-class routes — and the rules that make it valid.

Pure logic: the controller holds a :class:`DesiredState`, changes it only through :func:`validate_state`,
and bumps a version on every change that routers must see. Routes are keyed by name: every workload
class has one, and trial routes (the tuner's, named ``trial-...``) are extra names that only the
``x-workload-class`` header reaches; each trial route measures for one class (``trial_classes``), whose SLOs
its requests are judged by.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.engines.base import EngineSpec
from gateway.planner import EngineKnobs, GpuSpec, ModelSpec, evaluate_tp

POOL_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
WEIGHT_TOLERANCE = 1e-6
TRIAL_ROUTE_PREFIX = "trial-"


def is_trial_route(name: str) -> bool:
    return name.startswith(TRIAL_ROUTE_PREFIX)


class StateError(ValueError):
    """A desired state that cannot be served; the message names the offending pool, route or value."""


@dataclass(frozen=True)
class PoolSpec:
    """An engine pool: ``replicas`` engine replicas, each on ``engine.tp`` GPUs."""

    id: str
    engine: EngineSpec
    replicas: int

    @property
    def tp(self) -> int:
        return self.engine.tp

    @property
    def gpus(self) -> int:
        return self.engine.tp * self.replicas


@dataclass(frozen=True)
class DesiredState:
    """Pools and routes (route name -> pool id -> weight). Weights of a route sum to 1."""

    pools: Mapping[str, PoolSpec] = field(default_factory=dict)
    routes: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    trial_classes: Mapping[str, str] = field(default_factory=dict)  # trial route -> the class it measures for

    @property
    def gpus_used(self) -> int:
        return sum(pool.gpus for pool in self.pools.values())

    def with_pool(self, pool: PoolSpec) -> DesiredState:
        return replace(self, pools={**self.pools, pool.id: pool})

    def with_route(self, name: str, weights: Mapping[str, float], *, trial_class: str | None = None) -> DesiredState:
        trial_classes = dict(self.trial_classes)
        if trial_class is not None:
            trial_classes[name] = trial_class
        return replace(self, routes={**self.routes, name: dict(weights)}, trial_classes=trial_classes)

    def without_route(self, name: str) -> DesiredState:
        return replace(self, routes={k: v for k, v in self.routes.items() if k != name},
                       trial_classes={k: v for k, v in self.trial_classes.items() if k != name})

    def without_pool(self, pool_id: str) -> DesiredState:
        """Drop a pool and take it out of every route, renormalising what is left; empty routes vanish."""
        routes = {}
        for name, weights in self.routes.items():
            rest = {p: w for p, w in weights.items() if p != pool_id}
            total = sum(rest.values())
            if rest and total > 0:
                routes[name] = {p: w / total for p, w in rest.items()}
        return DesiredState(pools={k: v for k, v in self.pools.items() if k != pool_id}, routes=routes,
                            trial_classes={k: v for k, v in self.trial_classes.items() if k in routes})

    def pools_in_routes(self) -> set[str]:
        return {pool_id for weights in self.routes.values() for pool_id, w in weights.items() if w > 0}


@dataclass(frozen=True)
class Capacity:
    """What the state must fit: the model, the GPU type and the GPU budget."""

    model: ModelSpec
    gpu: GpuSpec
    gpus: int
    gpus_per_node: int


def validate_state(state: DesiredState, capacity: Capacity) -> None:
    """Raise :class:`StateError` with the reason when ``state`` cannot be served."""
    for pool_id, pool in state.pools.items():
        validate_pool(pool, capacity)
        if pool_id != pool.id:
            raise StateError(f"pool {pool.id!r} is filed under {pool_id!r}")
    if state.gpus_used > capacity.gpus:
        detail = ", ".join(f"{p.id}={p.replicas}x{p.tp}" for p in state.pools.values())
        raise StateError(f"pools need {state.gpus_used} GPUs ({detail}), more than the budget of {capacity.gpus}")
    for name, weights in state.routes.items():
        validate_route(name, weights, state.pools)
    for name in state.trial_classes:
        if name not in state.routes or not is_trial_route(name):
            raise StateError(f"{name!r} is not a trial route of this state")


def validate_pool(pool: PoolSpec, capacity: Capacity) -> None:
    if not POOL_ID_PATTERN.match(pool.id):
        raise StateError(f"pool id {pool.id!r} must be 1-48 lowercase letters, digits or '-'")
    if pool.replicas < 1:
        raise StateError(f"pool {pool.id!r}: replicas must be at least 1, not {pool.replicas}")
    verdict = evaluate_tp(
        capacity.model,
        capacity.gpu,
        pool.tp,
        gpus=capacity.gpus,
        gpus_per_node=capacity.gpus_per_node,
        knobs=pool.engine.knobs,
    )
    if not verdict.feasible:
        raise StateError(f"pool {pool.id!r}: {verdict.reason}")
    if pool.replicas > verdict.max_replicas:
        raise StateError(
            f"pool {pool.id!r}: {pool.replicas} replicas at tp={pool.tp} exceed the {verdict.max_replicas} "
            f"that fit {capacity.gpus} GPUs"
        )


def validate_route(name: str, weights: Mapping[str, float], pools: Mapping[str, PoolSpec]) -> None:
    if not weights:
        raise StateError(f"route {name!r} has no pools")
    for pool_id, weight in weights.items():
        if pool_id not in pools:
            raise StateError(f"route {name!r} names unknown pool {pool_id!r}")
        if not (isinstance(weight, int | float) and math.isfinite(weight) and 0 <= weight <= 1):
            raise StateError(f"route {name!r}: weight of {pool_id!r} must be in [0, 1], not {weight!r}")
    total = sum(weights.values())
    if abs(total - 1) > WEIGHT_TOLERANCE:
        raise StateError(f"route {name!r}: weights sum to {total:g}, not 1")


# --- serialization (the state store, the admin API) ----------------------------------------------------------


def pool_to_dict(pool: PoolSpec) -> dict[str, Any]:
    engine = pool.engine
    return {
        "id": pool.id,
        "replicas": pool.replicas,
        "engine": {
            "engine": engine.engine, "model": engine.model, "served_model_name": engine.served_model_name,
            "gpu": engine.gpu, "tp": engine.tp, "knobs": engine.knobs.model_dump(), "time_scale": engine.time_scale,
            "deviation_file": engine.deviation_file, "extra_args": list(engine.extra_args),
        },
    }


def pool_from_dict(data: Mapping[str, Any]) -> PoolSpec:
    """Inverse of :func:`pool_to_dict`; KeyError, TypeError or ValueError on a malformed record."""
    engine = dict(data["engine"])
    engine["knobs"] = EngineKnobs.model_validate(engine["knobs"])
    engine["extra_args"] = tuple(engine["extra_args"])
    return PoolSpec(id=str(data["id"]), engine=EngineSpec(**engine), replicas=int(data["replicas"]))


def state_to_dict(state: DesiredState) -> dict[str, Any]:
    return {
        "pools": [pool_to_dict(pool) for pool in state.pools.values()],
        "routes": {name: dict(weights) for name, weights in state.routes.items()},
        "trial_classes": dict(state.trial_classes),
    }


def state_from_dict(data: Mapping[str, Any]) -> DesiredState:
    """Inverse of :func:`state_to_dict`; KeyError, TypeError or ValueError on a malformed record."""
    pools = {pool.id: pool for pool in map(pool_from_dict, data["pools"])}
    routes = {str(name): {str(p): float(w) for p, w in weights.items()} for name, weights in data["routes"].items()}
    return DesiredState(pools=pools, routes=routes, trial_classes=dict(data.get("trial_classes", {})))
