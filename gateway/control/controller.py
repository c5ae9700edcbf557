"""The controller: one named, detached Ray actor holding the desired state, the live endpoints and the drains.

The Kubernetes controller pattern, on Ray:

- **One writer.** ``apply``, ``add_pool``, ``set_route``, ``remove_route`` and ``remove_pool`` (and the background
  loops' repairs and deletions) change the state under one lock; validation and the GPU-budget check happen
  inside it, so two writers can never both pass the check, an update is never lost, and a pool re-added while
  it drains is never deleted. A deploy that fails leaves no Serve application behind and the state unchanged.
- **Level-triggered.** Pool replicas assert their engine's endpoint on every health check (see
  :mod:`gateway.control.endpoints`); a missed message or a slow probe heals by itself.
- **Reconcile.** A loop compares the desired pools with the Serve applications that run and repairs the
  difference (a missing pool is deployed again, an orphan deleted), reporting each repair as an event.
- **Draining that cannot cut requests** (:mod:`gateway.control.drain`).
- **Recoverable.** The state is persisted (:mod:`gateway.control.store`) on every change; a restarted controller
  reloads it, takes a new *epoch* (routers accept its table whatever its version), and publishes its first table
  only once the pools' replicas have re-asserted their endpoints (or a grace period passed), so routers keep
  serving on their last table meanwhile.

Cluster operations go through a :class:`PoolDeployer` (Ray Serve in production, a fake in tests), called in a
worker thread. Times are monotonic seconds from an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import aiohttp

from gateway.control.drain import DrainTracker, RouterReport
from gateway.control.drift_board import DriftBoard
from gateway.control.endpoints import EndpointRegistry
from gateway.control.events import EventLog
from gateway.control.metric_reports import MetricReports, select
from gateway.control.promotion import PromotionConflict, PromotionPolicy, promotion_to_dict
from gateway.control.promotion_driver import PromotionDriver
from gateway.control.reconcile import AppStatus, plan_repairs
from gateway.control.state import (
    Capacity,
    DesiredState,
    PoolSpec,
    StateError,
    is_trial_route,
    pool_to_dict,
    validate_pool,
    validate_state,
)
from gateway.control.store import StateStore, StoredState, StoreError
from gateway.dataplane.auth import engine_key
from gateway.dataplane.routing import STOP_PHASES, Endpoint, PoolView, RouteSlo, RoutingTable, StopPhase
from gateway.exposition import Samples

logger = logging.getLogger("tpgate.controller")

CONTROLLER_NAME = "tpgate-controller"
NAMESPACE = "tpgate"
ROUTER_REPORT_STALE_S = 3.0
PROBE_PERIOD_S = 2.0
PROBE_TIMEOUT_S = 2.0
PROBE_FAILURES_BEFORE_RETRACT = 2
DRAIN_POLL_S = 0.2


class PoolDeployer(Protocol):
    """Creates and deletes pools on the cluster. Calls may block; the controller runs them in a thread."""

    def deploy(self, pool: PoolSpec) -> None:
        """Create or update the pool's application; raise if that failed (the controller then deletes it)."""
        ...

    def delete(self, pool_id: str) -> None: ...

    def statuses(self) -> dict[str, tuple[str, str]]:
        """Every pool application of this gateway that the cluster runs: pool id -> (status, message)."""
        ...


class DeployError(RuntimeError):
    """A pool could not be deployed; nothing of it was left behind and the desired state did not change."""

    def __init__(self, pool_id: str, reason: str) -> None:
        super().__init__(f"pool {pool_id!r}: deploy failed: {reason}")
        self.pool_id = pool_id
        self.reason = reason

    def __reduce__(self) -> tuple[type[DeployError], tuple[str, str]]:
        # Ray pickles it to the caller; the default would call DeployError(message) and fail there, which the
        # caller saw as an unserializable exception instead of the reason
        return (DeployError, (self.pool_id, self.reason))


@dataclass(frozen=True)
class ControllerSettings:
    """What the controller is configured with; ``digest`` fingerprints it, so a later ``tpgate serve`` can tell
    whether a controller it finds in the cluster was started with the same settings."""

    model_name: str
    classes: tuple[str, ...]
    default_class: str
    capacity: Capacity
    slos: Mapping[str, RouteSlo] = field(default_factory=dict)  # class -> per-request targets
    drain_deadline_s: float = 60.0  # a drain ends here even with requests still reported
    lease_s: float = 10.0  # an endpoint not re-asserted this long leaves routing
    recovery_grace_s: float = 10.0  # a restored controller publishes after this at the latest
    reconcile_period_s: float = 5.0
    reconcile_grace_s: float = 15.0  # a pool deployed this recently is not "missing" from the cluster yet
    store_path: str | None = None
    gateway_url: str = ""  # where clients reach the gateway (for status readers such as the tuner)
    promotion_policies: Mapping[str, PromotionPolicy] = field(default_factory=dict)  # class -> how it is promoted
    engine_key_seed: str | None = field(default=None, repr=False)  # engines beyond loopback: per-pool keys
    digest: str = ""


@dataclass
class _PoolPhase:
    phase: str  # deploying | running | deploy_failed | unhealthy | draining | ...
    message: str = ""


class Controller:
    """Desired state (versioned, persisted), endpoints registered by pool replicas, in-flight reports from routers."""

    def __init__(
        self,
        settings: ControllerSettings,
        deployer: PoolDeployer,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._deployer = deployer
        self._clock = clock
        self.epoch = uuid.uuid4().hex[:12]
        self._store = StateStore(settings.store_path) if settings.store_path else None
        self._events = EventLog(wall_clock=wall_clock)
        self._endpoints = EndpointRegistry(lease_s=settings.lease_s)
        self._drains = DrainTracker(report_stale_s=ROUTER_REPORT_STALE_S)
        self._write_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._background_started = False
        self._phases: dict[str, _PoolPhase] = {}
        self._deployed_at: dict[str, float] = {}
        self._deleting: dict[str, asyncio.Event] = {}  # pools whose application is being deleted
        self._probe_failures: dict[str, int] = {}
        self._started_at = clock()
        self._desired = DesiredState()
        self._records: dict[str, Any] = {}
        self._version = 0
        self.store_error: str | None = None
        self.restored = False
        self._owner = ""  # the `tpgate serve` process that runs this gateway, and when it last said so
        self._owner_seen_at: float | None = None
        self._stop_phase: StopPhase = ""  # not persisted: a stop concerns this run of the gateway only
        self._stop_version = 0  # the table version that first carried the current stop phase
        stored = self._load_store()
        if stored is not None:
            self._desired, self._version, self._records = stored.state, stored.version, dict(stored.records)
            self.restored = bool(stored.state.pools)
            for pool_id in self._desired.pools:
                self._deployed_at[pool_id] = self._started_at
        self._recovering = self.restored
        self._wall_clock = wall_clock
        self._reports = MetricReports()
        self._drift = DriftBoard()
        self._promotions = PromotionDriver(_PromotionHost(self), self._reports,
                                           stored=self._records.get("promotions"), wall_clock=wall_clock)
        self._events.add("controller.started", f"controller epoch {self.epoch} started"
                         + (f", restored state version {self._version} from {settings.store_path}"
                            if self.restored else ""))

    # --- identity --------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Who this controller is: epoch, settings digest, whether it restored a stored state (or why not), and
        which ``tpgate serve`` runs it (``owner_silent_s``: seconds since it last said so; None: never)."""
        self._ensure_background_tasks()
        silent_s = None if self._owner_seen_at is None else self._clock() - self._owner_seen_at
        return {"epoch": self.epoch, "digest": self._settings.digest, "restored": self.restored,
                "store_error": self.store_error, "version": self._version, "owner": self._owner,
                "owner_silent_s": silent_s, "pools": len(self._desired.pools), "routes": len(self._desired.routes)}

    def heartbeat(self, owner: str) -> None:
        """The ``tpgate serve`` process running this gateway says it is alive (every few seconds)."""
        self._owner, self._owner_seen_at = owner, self._clock()

    # --- stopping -------------------------------------------------------------------------------------------

    def set_stop_phase(self, phase: StopPhase) -> int:
        """Tell the routers the gateway is stopping: ``"draining"`` refuses new requests while those in flight
        finish, ``"ending"`` also ends those in flight, ``""`` serves again (a reused controller). Returns the
        table version that carries the phase."""
        if phase not in STOP_PHASES:
            raise self._reject(f"unknown stop phase {phase!r} (one of {', '.join(map(repr, STOP_PHASES))})")
        if phase != self._stop_phase:
            self._stop_phase = phase
            self._bump()
            self._stop_version = self._version
            self._events.add("gateway.stopping", f"stop phase {phase or 'serving'} (table v{self._version})")
        return self._stop_version

    def inflight(self) -> dict[str, Any]:
        """Requests in flight or waiting at a gate, summed over the live routers (``requests``, ``routers``), and
        whether every live router counted them under a table that carries the current stop phase (``current``):
        until then a router may still admit a request it has not counted."""
        self._ensure_background_tasks()
        live = self._drains.live_reports(now_s=self._clock())
        return {
            "requests": sum(sum(report.inflight_by_pool.values()) for report in live),
            "routers": len(live),
            "current": all(r.epoch == self.epoch and r.version >= self._stop_version for r in live),
        }

    # --- desired state (the one writer) ----------------------------------------------------------------------

    async def apply(self, state: DesiredState) -> int:
        """Replace the whole desired state: deploy new or resized pools, reroute, drain pools no longer wanted."""
        if self._promotions.active():
            raise self._reject(f"promotions in progress ({', '.join(p.id for p in self._promotions.active())}); "
                               "the whole state cannot be replaced until they end")
        async with self._write_lock:
            self._validate(state)
            await self._deploy_all([p for p in state.pools.values() if self._desired.pools.get(p.id) != p])
            removed = [p for p in self._desired.pools if p not in state.pools]
            self._commit(state, "state applied: " + _describe_routes(state))
            for pool_id in removed:
                self._start_drain(pool_id)
            return self._version

    async def add_pool(self, pool: PoolSpec) -> int:
        """Deploy a pool (or resize one); it takes traffic only once a route names it."""
        self._refuse_if_promoting(pool=pool.id)
        return await self._add_pool(pool)

    async def _add_pool(self, pool: PoolSpec) -> int:
        async with self._write_lock:
            state = self._desired.with_pool(pool)
            self._validate(state)
            if self._desired.pools.get(pool.id) == pool:
                return self._version
            await self._deploy_all([pool])
            self._commit(state, f"pool {pool.id}: {pool.replicas} x tp{pool.tp} requested", pool=pool.id)
            return self._version

    async def set_route(self, name: str, weights: Mapping[str, float], *, trial_class: str | None = None) -> int:
        """Set a route's weights. A trial route (``trial-...``) names the class it measures for."""
        self._refuse_if_promoting(route=name)
        return await self._set_route(name, weights, trial_class=trial_class)

    async def _set_route(self, name: str, weights: Mapping[str, float], *, trial_class: str | None = None) -> int:
        async with self._write_lock:
            if is_trial_route(name) and trial_class is None and name not in self._desired.trial_classes:
                raise self._reject(f"trial route {name!r} needs the class it measures for")
            if trial_class is not None and (not is_trial_route(name) or trial_class not in self._settings.classes):
                raise self._reject(f"trial_class {trial_class!r} must be a workload class, on a trial route")
            state = self._desired.with_route(name, weights, trial_class=trial_class)
            self._validate(state)
            if state == self._desired:
                return self._version
            self._commit(state, f"route {name}: {_describe_weights(weights)}", route=name)
            return self._version

    async def remove_route(self, name: str) -> int:
        """Remove a trial route (a workload class always keeps its route)."""
        async with self._write_lock:
            if not is_trial_route(name):
                raise self._reject(f"route {name!r} belongs to a workload class and cannot be removed")
            if name not in self._desired.routes:
                return self._version
            self._commit(self._desired.without_route(name), f"route {name} removed", route=name)
            return self._version

    async def remove_pool(self, pool_id: str) -> int:
        """Take a pool out of every route now, then delete it once drained (in the background)."""
        self._refuse_if_promoting(pool=pool_id)
        return await self._remove_pool(pool_id)

    async def _remove_pool(self, pool_id: str) -> int:
        async with self._write_lock:
            if pool_id not in self._desired.pools:
                raise self._reject(f"unknown pool {pool_id!r}")
            for name, weights in self._desired.routes.items():
                if not is_trial_route(name) and {p for p, w in weights.items() if w > 0} == {pool_id}:
                    raise self._reject(f"pool {pool_id!r} is the only pool of route {name!r}; route it elsewhere first")
            self._commit(self._desired.without_pool(pool_id), f"pool {pool_id}: removed from every route",
                         pool=pool_id)
            self._start_drain(pool_id)
            return self._version

    def desired_state(self) -> DesiredState:
        return self._desired

    def records(self, section: str) -> Any:
        """A record section of the store (promotion history, study references), or None."""
        return self._records.get(section)

    async def put_records(self, section: str, value: Any) -> None:
        """Replace a record section and persist it (JSON-safe values)."""
        async with self._write_lock:
            self._records[section] = value
            self._persist()

    # --- promotions ------------------------------------------------------------------------------------------

    async def start_promotion(
        self, class_name: str, pool: PoolSpec, *, source: str, judge: bool = True
    ) -> dict[str, Any]:
        """Move ``class_name`` to the new ``pool`` in the configured steps, judging each (``judge`` False: one step
        without analysis, for a rollback to a known configuration). Returns the promotion as it stands once its
        first actions ran; :class:`StateError` (a :class:`PromotionConflict` for a conflict) when refused."""
        self._ensure_background_tasks()
        if class_name not in self._settings.classes:
            raise self._reject(f"unknown class {class_name!r} (classes: {', '.join(self._settings.classes)})")
        try:
            validate_pool(pool, self._settings.capacity)
        except StateError as exc:
            raise self._reject(str(exc)) from None
        policy = self._settings.promotion_policies.get(class_name, PromotionPolicy())
        if not judge:
            policy = replace(policy, steps=(1.0,), judge=False)
        promotion_id = f"{class_name}-{uuid.uuid4().hex[:6]}"
        try:
            promotion = await self._promotions.start(promotion_id=promotion_id, class_name=class_name,
                                                     candidate=pool, policy=policy, source=source)
        except PromotionConflict as exc:
            raise self._reject(str(exc)) from None
        return promotion_to_dict(promotion)

    def promotions(self) -> list[dict[str, Any]]:
        """Every promotion the store remembers, oldest first."""
        return [promotion_to_dict(p) for p in self._promotions.all()]

    def promotion(self, promotion_id: str) -> dict[str, Any]:
        return promotion_to_dict(self._promotions.get(promotion_id))

    async def abort_promotion(self, promotion_id: str, reason: str = "aborted by the operator") -> dict[str, Any]:
        """Roll an active promotion back now (weights to the old pools at once, the new pool drained)."""
        return promotion_to_dict(await self._promotions.abort(promotion_id, reason))

    async def rollback_class(self, class_name: str) -> dict[str, Any]:
        """Abort the class's promotion in progress; with none, bring back the pool its last successful promotion
        replaced (in one step, without analysis). :class:`PromotionConflict` when there is nothing to go back to."""
        if class_name not in self._settings.classes:
            raise self._reject(f"unknown class {class_name!r}")
        active = self._promotions.owner_of_class(class_name)
        if active is not None:
            return await self.abort_promotion(active.id, "rolled back by the operator")
        done = [p for p in self._promotions.all() if p.class_name == class_name and p.phase == "succeeded"]
        if not done:
            raise self._reject(PromotionConflict(f"class {class_name!r} has no promotion to roll back"))
        last = done[-1]
        if len(last.old_pools) != 1:
            raise self._reject(PromotionConflict(
                f"the route promotion {last.id} replaced had {len(last.old_pools)} pools; set them again with "
                "POST /admin/pools and PUT /admin/routes/{class}"))
        (previous,) = last.old_pools.values()
        running = self._desired.pools.get(previous.id)
        if running == previous:  # another class's route kept it, as it was: route the class straight back
            return await self._route_back(class_name, last.id, previous.id, last.candidate.id)
        pool_id = previous.id if running is None else f"{previous.id[:44]}-rb"
        return await self.start_promotion(class_name, replace(previous, id=pool_id),
                                          source=f"rollback of {last.id}", judge=False)

    async def _route_back(self, class_name: str, promotion_id: str, pool_id: str, promoted_id: str) -> dict[str, Any]:
        """The class back on ``pool_id`` at once; the promoted pool drained and removed unless another route uses
        it. No new pool, so no room to make: the pool it replaced never left."""
        await self._set_route(class_name, {pool_id: 1.0})
        if promoted_id in self._desired.pools and not any(promoted_id in w for w in self._desired.routes.values()):
            await self._remove_pool(promoted_id)
        reason = f"rolled back by the operator: class {class_name} back on {pool_id}, which still ran"
        return promotion_to_dict(await self._promotions.mark_undone(promotion_id, reason))

    def report_metrics(self, router_id: str, samples: Samples) -> dict[str, Any]:
        """A router's series of the classes under promotion. Returns what it should report next time (the classes)
        and the promotion step of each class (for its ``tpgate_promotion_step`` gauge)."""
        self._ensure_background_tasks()
        watched = self._promotions.watched()
        self._reports.report(router_id, select(samples, watched), now_s=self._clock())
        return {"classes": sorted(watched), "steps": {c: {"step": s, "weight": w} for c, (s, w) in watched.items()},
                "drifted": self._drift.drifted(now_s=self._clock())}

    def report_drift(self, class_name: str, report: Mapping[str, Any]) -> dict[str, Any]:
        """The drift monitor's latest verdict on a class (see :mod:`gateway.control.drift_board`); the events it
        brings (drifted, cleared, a re-tune ended) go to the event log. Returns the report as kept."""
        if class_name not in self._settings.classes:
            raise StateError(f"unknown class {class_name!r} (classes: {', '.join(self._settings.classes)})")
        now = self._clock()
        for event in self._drift.report(class_name, report, now_s=now):
            self._events.add(event.kind, event.message, route=class_name)
        return self._drift.as_dict(now_s=now)[class_name]

    def _refuse_if_promoting(self, *, pool: str | None = None, route: str | None = None) -> None:
        owner = (self._promotions.owner_of_pool(pool) if pool is not None
                 else self._promotions.owner_of_class(route) if route is not None else None)
        if owner is not None:
            what = f"pool {pool!r}" if pool is not None else f"route {route!r}"
            raise self._reject(PromotionConflict(
                f"{what} belongs to promotion {owner.id} ({owner.phase}, step {owner.step + 1}/"
                f"{len(owner.policy.steps)}); wait for it or abort it first"))

    # --- routers ---------------------------------------------------------------------------------------------

    def routing_table(self) -> RoutingTable:
        self._ensure_background_tasks()
        desired = self._desired
        seed = self._settings.engine_key_seed
        pools = {
            pool_id: PoolView(
                id=pool_id,
                tp=pool.tp,
                replicas=pool.replicas,
                endpoints=tuple(Endpoint(r, url) for r, url in sorted(self._endpoints.endpoints(pool_id).items())),
                time_scale=pool.engine.time_scale if pool.engine.engine == "sim" else 1.0,
                simulated=pool.engine.engine == "sim",
                api_key=None if seed is None else engine_key(seed, pool_id),
            )
            for pool_id, pool in desired.pools.items()
        }
        slos = {}
        for route in desired.routes:
            class_name = desired.trial_classes.get(route, route)
            if class_name in self._settings.slos:
                slos[route] = self._settings.slos[class_name]
        return RoutingTable(
            version=self._version,
            epoch=self.epoch,
            model=self._settings.model_name,
            classes=self._settings.classes,
            default_class=self._settings.default_class,
            routes={name: dict(w) for name, w in desired.routes.items()},
            pools=pools,
            slos=slos,
            stop_phase=self._stop_phase,
        )

    async def watch(self, epoch: str, version: int, timeout_s: float = 10.0) -> RoutingTable | None:
        """Long poll: the table as soon as it differs from (``epoch``, ``version``); None when nothing changed
        within ``timeout_s``, or while a restored controller still waits for its replicas to re-assert."""
        self._ensure_background_tasks()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._recovering or (epoch == self.epoch and version == self._version):
            self._end_recovery_if_complete()
            if not self._recovering and (epoch, version) != (self.epoch, self._version):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
        return self.routing_table()

    def report_inflight(self, router_id: str, epoch: str, version: int, inflight_by_pool: dict[str, int]) -> None:
        """A router's count of requests in flight or waiting, per pool, under the table (epoch, version)."""
        self._ensure_background_tasks()
        self._drains.report(RouterReport(router_id, epoch, version, dict(inflight_by_pool), self._clock()))

    # --- pool replicas ---------------------------------------------------------------------------------------

    def register_endpoint(self, pool_id: str, replica_id: str, url: str) -> bool:
        """A replica's engine is healthy at ``url`` (asserted on every health check). Idempotent: the version
        changes only when routing does. Returns whether the pool is wanted (False: the replica may stop)."""
        self._ensure_background_tasks()
        if pool_id not in self._desired.pools and pool_id not in self._drains.draining():
            return False
        if self._endpoints.assert_endpoint(pool_id, replica_id, url, now_s=self._clock()):
            self._probe_failures.pop(url, None)
            self._events.add("replica.ready", f"pool {pool_id}: replica {replica_id} ready at {url}", pool=pool_id)
            self._bump()
            self._end_recovery_if_complete()
        return True

    def deregister_endpoint(self, pool_id: str, replica_id: str) -> None:
        """A replica's engine is not healthy (or the replica is stopping): out of routing until re-asserted."""
        if self._endpoints.retract(pool_id, replica_id):
            self._events.add("replica.gone", f"pool {pool_id}: replica {replica_id} left routing", pool=pool_id)
            self._bump()

    # --- observability ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Pools (desired vs ready replicas, phase), draining pools, routes, GPU use, version and recent events."""
        self._ensure_background_tasks()
        now = self._clock()
        pools = {}
        for pool_id, pool in self._desired.pools.items():
            endpoints = self._endpoints.endpoints(pool_id)
            phase = self._phases.get(pool_id, _PoolPhase("deploying"))
            pools[pool_id] = {
                **pool_to_dict(pool),
                "tp": pool.tp,
                "gpus": pool.gpus,
                "ready_replicas": len(endpoints),
                "phase": "running" if len(endpoints) >= pool.replicas and phase.phase != "deploy_failed"
                else phase.phase,
                "message": phase.message,
                "endpoints": endpoints,
            }
        draining: dict[str, dict[str, Any]] = {
            pool_id: {"phase": "draining", "inflight": self._drains.inflight(pool_id, now_s=now),
                      "for_s": round(now - self._drains.started_at(pool_id), 1)}
            for pool_id in sorted(self._drains.draining())
        }
        draining.update({pool_id: {"phase": "deleting"} for pool_id in self._deleting})
        budget = self._settings.capacity.gpus
        return {
            "version": self._version,
            "epoch": self.epoch,
            "model": self._settings.model_name,
            "gateway_url": self._settings.gateway_url,
            "gpus": {"budget": budget, "used": self._desired.gpus_used, "free": budget - self._desired.gpus_used},
            "pools": pools,
            "draining": draining,
            "routes": {name: dict(w) for name, w in self._desired.routes.items()},
            "trial_classes": dict(self._desired.trial_classes),
            "promotions": [promotion_to_dict(p) for p in self._promotions.all()[-10:]],
            "studies": self._records.get("studies") or {},
            "routers": len(self._drains.live_reports(now_s=now)),
            "drift": self._drift.as_dict(now_s=now),
            "events": [e.as_dict() for e in self._events.recent(50)],
        }

    def owned_applications(self) -> list[str]:
        """Pool ids this controller deployed or is draining: what teardown must delete."""
        return sorted(set(self._deployed_at) | set(self._desired.pools) | self._drains.draining() | set(self._deleting))

    # --- internals: writes -----------------------------------------------------------------------------------

    def _validate(self, state: DesiredState) -> None:
        for name in state.routes:
            if name not in self._settings.classes and not is_trial_route(name):
                raise self._reject(f"route {name!r} is neither a workload class nor a trial route (trial-...)")
        for pool_id, pool in state.pools.items():
            current = self._desired.pools.get(pool_id)
            if current is not None and current.engine != pool.engine:
                raise self._reject(f"pool {pool_id!r} exists with another engine configuration; use a new pool id")
        try:
            validate_state(state, self._settings.capacity)
        except StateError as exc:
            raise self._reject(str(exc)) from None

    def _reject(self, reason: str | StateError) -> StateError:
        error = reason if isinstance(reason, StateError) else StateError(reason)
        self._events.add("state.rejected", str(error))
        return error

    async def _deploy_all(self, pools: list[PoolSpec]) -> None:
        """Deploy each pool; on a failure, undo what this call deployed and raise :class:`DeployError`."""
        done: list[PoolSpec] = []
        for pool in pools:
            try:
                await self._deploy(pool)
            except Exception as exc:
                for undo in reversed(done):
                    await self._undo_deploy(undo)
                await self._undo_deploy(pool)
                self._events.add("pool.deploy_failed", f"pool {pool.id}: deploy failed, nothing left behind: {exc}",
                                 pool=pool.id)
                raise DeployError(pool.id, str(exc)) from exc
            done.append(pool)

    async def _deploy(self, pool: PoolSpec) -> None:
        if pool.id in self._deleting:  # re-added while its application is being deleted: deploy after that
            await self._deleting[pool.id].wait()
        self._drains.stop(pool.id)
        self._phases[pool.id] = _PoolPhase("deploying", f"{pool.replicas} x tp{pool.tp}")
        self._events.add("pool.deploying", f"pool {pool.id}: deploying {pool.replicas} x tp{pool.tp}", pool=pool.id)
        self._deployed_at[pool.id] = self._clock()
        await asyncio.to_thread(self._deployer.deploy, pool)

    async def _undo_deploy(self, pool: PoolSpec) -> None:
        previous = self._desired.pools.get(pool.id)
        try:
            if previous is None:
                await asyncio.to_thread(self._deployer.delete, pool.id)
                self._deployed_at.pop(pool.id, None)
                self._phases.pop(pool.id, None)
            else:  # a resize that failed: back to what ran before
                await asyncio.to_thread(self._deployer.deploy, previous)
        except Exception as exc:  # the reconcile loop retries what is left
            logger.warning("pool %s: undoing a failed deploy failed: %s", pool.id, exc)

    def _commit(self, state: DesiredState, message: str, *, pool: str | None = None, route: str | None = None) -> None:
        self._desired = state
        for pool_id in state.pools:
            self._drains.stop(pool_id)  # re-added while it drained: it stays
        self._version += 1
        self._persist()
        self._events.add("state.changed", f"v{self._version}: {message}", pool=pool, route=route)
        self._notify()

    def _persist(self) -> None:
        if self._store is not None:
            self._store.save(StoredState(self._desired, self._version, self._records))

    def _load_store(self) -> StoredState | None:
        if self._store is None:
            return None
        try:
            stored = self._store.load()
        except StoreError as exc:
            self.store_error = str(exc)
            self._store = None  # never overwrite a store we could not read
            return None
        if stored is not None:
            try:
                validate_state(stored.state, self._settings.capacity)
            except StateError as exc:
                self.store_error = (f"{self._settings.store_path}: the stored state does not fit this configuration "
                                    f"({exc}); start with --reset-state to replace it from the configuration")
                self._store = None
                return None
        return stored

    def _bump(self) -> None:
        self._version += 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- internals: draining ---------------------------------------------------------------------------------

    def _start_drain(self, pool_id: str) -> None:
        self._phases[pool_id] = _PoolPhase("draining", "waiting for in-flight requests")
        self._drains.start(pool_id, out_of_routes_version=self._version, now_s=self._clock(),
                           deadline_s=self._settings.drain_deadline_s)
        self._events.add("drain.started", f"pool {pool_id}: draining (deadline {self._settings.drain_deadline_s:g} s)",
                         pool=pool_id)
        self._spawn(self._drain_then_delete(pool_id))

    async def _drain_then_delete(self, pool_id: str) -> None:
        while True:
            if pool_id not in self._drains.draining():
                return  # re-added
            verdict = self._drains.verdict(pool_id, epoch=self.epoch, now_s=self._clock())
            if verdict != "wait":
                break
            await asyncio.sleep(DRAIN_POLL_S)
        async with self._write_lock:  # decided under the lock; the slow delete runs outside it
            if pool_id not in self._drains.draining() or pool_id in self._desired.pools:
                return  # re-added while we waited for the lock
            took_s = self._clock() - self._drains.started_at(pool_id)
            inflight = self._drains.inflight(pool_id, now_s=self._clock())
            self._drains.stop(pool_id)
            deleted = self._deleting[pool_id] = asyncio.Event()
        try:
            await asyncio.to_thread(self._deployer.delete, pool_id)
        except Exception as exc:  # the reconcile loop deletes the orphan later
            self._events.add("reconcile.failed", f"pool {pool_id}: delete failed: {exc}", pool=pool_id)
            return
        finally:
            del self._deleting[pool_id]
            deleted.set()
        if pool_id not in self._desired.pools:  # not re-added (a re-add waits for this delete, then deploys)
            self._endpoints.drop_pool(pool_id)
            self._phases.pop(pool_id, None)
            self._deployed_at.pop(pool_id, None)
        if verdict == "deadline":
            self._events.add("drain.deadline", f"pool {pool_id}: deleted at the drain deadline "
                             f"({took_s:.1f} s) with {inflight} requests still reported", pool=pool_id)
        else:
            self._events.add("drain.finished", f"pool {pool_id}: drained and deleted after {took_s:.1f} s",
                             pool=pool_id)
        self._bump()

    # --- internals: background loops ------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_background_tasks(self) -> None:
        if self._background_started:
            return
        self._background_started = True
        self._spawn(self._reconcile_forever())
        self._spawn(self._probe_endpoints_forever())
        self._spawn(self._promotions.run_forever())
        for pool_id in self._drains.draining():
            self._spawn(self._drain_then_delete(pool_id))

    def _end_recovery_if_complete(self) -> None:
        if not self._recovering:
            return
        complete = all(len(self._endpoints.endpoints(p)) >= pool.replicas for p, pool in self._desired.pools.items())
        if complete or self._clock() - self._started_at >= self._settings.recovery_grace_s:
            self._recovering = False
            self._notify()

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self._settings.reconcile_period_s, 1.0) if self._recovering
                                else self._settings.reconcile_period_s)
            self._end_recovery_if_complete()
            for pool_id, replica_id in self._endpoints.expire(now_s=self._clock()):
                self._events.add("replica.gone", f"pool {pool_id}: replica {replica_id} stopped renewing its "
                                 f"endpoint for {self._settings.lease_s:g} s", pool=pool_id)
                self._bump()
            try:
                await self.reconcile()
            except Exception as exc:  # the cluster API can fail transiently; the next round retries
                logger.warning("reconcile failed: %s", exc)

    async def reconcile(self, *, now: bool = False) -> None:
        """One round: compare the desired pools with the applications the cluster runs, and repair. ``now``:
        also deploy pools deployed moments ago (a restored state on a fresh cluster)."""
        statuses = await asyncio.to_thread(self._deployer.statuses)
        async with self._write_lock:
            running = {pool_id: AppStatus(status.lower(), message) for pool_id, (status, message) in statuses.items()}
            self._update_phases(running)
            clock_s = self._clock()
            repairs = plan_repairs(
                desired=self._desired.pools,
                running=running,
                draining=self._drains.draining() | set(self._deleting),
                recently_deployed=set() if now else {p for p, at in self._deployed_at.items()
                                                     if clock_s - at < self._settings.reconcile_grace_s},
            )
            for repair in repairs:
                try:
                    if repair.action == "deploy":
                        await self._deploy(self._desired.pools[repair.pool_id])
                    else:
                        await asyncio.to_thread(self._deployer.delete, repair.pool_id)
                        self._deployed_at.pop(repair.pool_id, None)
                except Exception as exc:
                    self._events.add("reconcile.failed", f"pool {repair.pool_id}: {repair.action} failed: {exc}",
                                     pool=repair.pool_id)
                    continue
                self._events.add("reconcile.repair", f"pool {repair.pool_id}: {repair.reason}; {repair.action}ed",
                                 pool=repair.pool_id)

    def _update_phases(self, running: Mapping[str, AppStatus]) -> None:
        for pool_id, app in running.items():
            current = self._phases.get(pool_id)
            if pool_id not in self._desired.pools or (current is not None and current.phase == "draining"):
                continue
            new = _PoolPhase(app.status, app.message)
            if current != new:
                self._phases[pool_id] = new
                self._events.add("pool.phase", f"pool {pool_id}: {new.phase} {new.message}".rstrip(), pool=pool_id)

    async def _probe_endpoints_forever(self) -> None:
        """Take endpoints whose engine stopped answering out of routing; their replica's next healthy check
        brings them back."""
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(PROBE_PERIOD_S)
                for pool_id, replica_id, url in self._endpoints.all_endpoints():
                    if await _answers(session, url):
                        self._probe_failures.pop(url, None)
                        continue
                    failures = self._probe_failures.get(url, 0) + 1
                    self._probe_failures[url] = failures
                    if failures >= PROBE_FAILURES_BEFORE_RETRACT:
                        self._probe_failures.pop(url, None)
                        self.deregister_endpoint(pool_id, replica_id)


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/health") as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def _describe_weights(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{pool} {weight:.0%}" for pool, weight in weights.items())


def _describe_routes(state: DesiredState) -> str:
    return "; ".join(f"{name}: {_describe_weights(w)}" for name, w in state.routes.items()) or "no routes"


class _PromotionHost:
    """The controller as the promotion driver sees it: its writes go through the one writer, without the guard
    that keeps everyone else off a promotion's pools and route."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    def desired_state(self) -> DesiredState:
        return self._controller._desired

    def free_gpus(self) -> int:
        return self._controller._settings.capacity.gpus - self._controller._desired.gpus_used

    def ready_replicas(self, pool_id: str) -> int:
        if pool_id not in self._controller._desired.pools:
            return 0
        return len(self._controller._endpoints.endpoints(pool_id))

    def pool_failure(self, pool_id: str) -> str | None:
        phase = self._controller._phases.get(pool_id)
        if pool_id not in self._controller._desired.pools or phase is None or phase.phase != "deploy_failed":
            return None
        return phase.message or phase.phase

    async def set_pool(self, pool: PoolSpec) -> None:
        await self._controller._add_pool(pool)

    async def set_weights(self, class_name: str, weights: Mapping[str, float]) -> None:
        await self._controller._set_route(class_name, weights)

    async def remove_pool(self, pool_id: str) -> None:
        await self._controller._remove_pool(pool_id)

    def record_event(self, kind: str, message: str, *, pool: str | None, route: str | None) -> None:
        self._controller._events.add(kind, message, pool=pool, route=route)

    async def save_records(self, section: str, value: Any) -> None:
        await self._controller.put_records(section, value)
