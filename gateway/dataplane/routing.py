"""Routing policy: which route a request belongs to, which pool serves it, which replica gets it.

Pure logic over a :class:`RoutingTable`, the versioned snapshot routers receive from the controller.
Randomness comes from an injected ``random.Random`` so tests are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.control.state import is_trial_route
from gateway.errors import ApiError

CLASS_HEADER = "x-workload-class"
ALIAS_SEPARATOR = ":"

# How far the gateway is in stopping: serving (""), refusing new requests while those in flight finish
# ("draining"), or ending the requests in flight too ("ending").
StopPhase = Literal["", "draining", "ending"]
STOP_PHASES: tuple[StopPhase, ...] = ("", "draining", "ending")


@dataclass(frozen=True)
class RouteSlo:
    """Per-request latency targets of a route's class, in the engine's clock (seconds; None: no target)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met(self, *, ttft_s: float | None, tpot_s: float | None, e2e_s: float) -> bool:
        """Whether one request met every target. A response that was not streamed reaches its client whole, so
        its first token came at ``e2e_s``; a request with one output token has no time per output token."""
        first_token_s = e2e_s if ttft_s is None else ttft_s
        return (
            (self.ttft_s is None or first_token_s <= self.ttft_s)
            and (self.tpot_s is None or tpot_s is None or tpot_s <= self.tpot_s)
            and (self.e2e_s is None or e2e_s <= self.e2e_s)
        )


@dataclass(frozen=True)
class Endpoint:
    """One healthy engine replica of a pool."""

    replica_id: str
    url: str


@dataclass(frozen=True)
class PoolView:
    """What a router needs to know of a pool."""

    id: str
    tp: int
    replicas: int  # desired
    endpoints: tuple[Endpoint, ...] = ()  # registered and healthy
    time_scale: float = 1.0  # how much faster than real time the engine's clock runs (simulated engines)
    simulated: bool = False
    api_key: str | None = field(default=None, repr=False)  # what the pool's engines require (beyond loopback)


@dataclass(frozen=True)
class RoutingTable:
    """The controller's routing state at one version. ``epoch`` names the controller instance that published it:
    a restarted controller has a new epoch, and routers take its table whatever its version."""

    version: int = 0
    epoch: str = ""
    model: str = ""  # the served model name clients use
    classes: tuple[str, ...] = ()  # workload classes (each has a route and a `<model>:<class>` alias)
    default_class: str = ""
    routes: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # route name -> pool id -> weight
    pools: Mapping[str, PoolView] = field(default_factory=dict)
    slos: Mapping[str, RouteSlo] = field(default_factory=dict)  # route name -> its class's per-request targets
    stop_phase: StopPhase = ""  # the gateway is stopping: routers refuse new requests (and end those in flight)

    @property
    def published(self) -> bool:
        """False for the empty table a router starts with, before the controller's first one arrives."""
        return bool(self.epoch)

    def production_routes(self) -> dict[str, Mapping[str, float]]:
        """The routes of workload classes (trial routes left out)."""
        return {name: weights for name, weights in self.routes.items() if name in self.classes}


@dataclass(frozen=True)
class Classification:
    route: str
    upstream_model: str  # the model name to send upstream (alias suffix removed)
    rewritten: bool  # whether the request's "model" must be rewritten


def classify(
    table: RoutingTable,
    *,
    model: object,
    header_class: str | None,
    key_class: str | None,
    trial_allowed: bool = False,
) -> Classification:
    """Pick the route: the ``x-workload-class`` header, then a ``<model>:<class>`` alias, then the API key's
    default class, then the deployment default. The model must be the served one or one of its aliases.
    The header may name a trial route only when ``trial_allowed`` (the caller holds the admin token): 403
    otherwise, so an ordinary API key never reaches a pool under measurement."""
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a string", param="model")
    base, sep, alias_class = model.partition(ALIAS_SEPARATOR)
    if base != table.model or (sep and alias_class not in table.classes):
        raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    if header_class is not None:
        reachable = table.routes if trial_allowed else table.production_routes()
        if header_class not in reachable:
            if is_trial_route(header_class):  # the same answer whether it exists or not: nothing about trials leaks
                raise ApiError(403, f"'{header_class}' in {CLASS_HEADER} is a trial route: only the admin token "
                               "reaches trial routes", param=CLASS_HEADER, code="trial_route_forbidden")
            known = ", ".join(sorted(reachable))
            raise ApiError(400, f"unknown workload class '{header_class}' in {CLASS_HEADER} (known: {known})",
                           param=CLASS_HEADER)
        route = header_class
    else:
        route = alias_class or key_class or table.default_class
    if route not in table.routes:
        raise ApiError(503, f"workload class '{route}' has no route yet", code="no_route")
    return Classification(route=route, upstream_model=base, rewritten=bool(sep))


def served_models(table: RoutingTable) -> list[tuple[str, bool]]:
    """``/v1/models``: the model, then one ``<model>:<class>`` alias per class, each with whether every pool
    that serves it runs a simulated engine."""
    def simulated(routes: list[str]) -> bool:
        pools = [table.pools[p] for r in routes for p in table.routes.get(r, {}) if p in table.pools]
        return bool(pools) and all(pool.simulated for pool in pools)

    entries = [(table.model, simulated(list(table.classes)))]
    return entries + [(f"{table.model}{ALIAS_SEPARATOR}{c}", simulated([c])) for c in table.classes]


def choose_pool(
    weights: Mapping[str, float],
    pools: Mapping[str, PoolView],
    rng: random.Random,
    *,
    exclude: Collection[str] = (),
) -> PoolView | None:
    """Weighted pick among the route's pools that have a healthy endpoint; None when none has."""
    candidates = [
        (pools[p], w) for p, w in weights.items()
        if w > 0 and p in pools and pools[p].endpoints and p not in exclude
    ]
    if not candidates:
        return None
    total = sum(w for _, w in candidates)
    point = rng.random() * total
    for pool, weight in candidates:
        point -= weight
        if point < 0:
            return pool
    return candidates[-1][0]


def choose_replica(
    endpoints: tuple[Endpoint, ...],
    inflight: Mapping[str, int],
    rng: random.Random,
    *,
    exclude: Collection[str] = (),
) -> Endpoint | None:
    """Power of two choices: sample two replicas, take the one with fewer outstanding requests."""
    candidates = [e for e in endpoints if e.replica_id not in exclude]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    first, second = rng.sample(candidates, 2)
    return first if inflight.get(first.replica_id, 0) <= inflight.get(second.replica_id, 0) else second
