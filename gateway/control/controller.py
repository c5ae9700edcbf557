"""The controller: one named, detached Ray actor holding the desired state and the live endpoints.

The tuner and the admin API change the desired state (pools and per-class routes); every change that
routers must see bumps a version. Routers follow it with :meth:`Controller.watch` (a long poll) and report
their in-flight requests per pool, which is how a pool is drained: it is first taken out of every route,
then deleted once no router reports a request on it (or a deadline passes). Pool deployment itself is
delegated to a :class:`PoolDeployer` (Ray Serve in production, a fake in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from gateway.control.state import Capacity, DesiredState, PoolSpec, StateError, validate_state
from gateway.dataplane.routing import Endpoint, PoolView, RoutingTable

logger = logging.getLogger("tpgate.controller")

CONTROLLER_NAME = "tpgate-controller"
NAMESPACE = "tpgate"
ROUTER_REPORT_STALE_S = 5.0
PROBE_PERIOD_S = 2.0
PROBE_FAILURES_BEFORE_REMOVAL = 2
EVENT_LOG_SIZE = 200


class PoolDeployer(Protocol):
    """Creates and deletes pools on the cluster. Calls may block; the controller runs them in a thread."""

    def deploy(self, pool: PoolSpec) -> None: ...

    def delete(self, pool_id: str) -> None: ...

    def statuses(self) -> dict[str, tuple[str, str]]:
        """pool id -> (status, message) as the cluster sees it."""
        ...


@dataclass
class PoolStatus:
    phase: str  # deploying | running | draining | failed | <cluster status>
    message: str = ""


class Controller:
    """Desired state, versioned; endpoints registered by pool replicas; in-flight reports from routers."""

    def __init__(
        self,
        *,
        model_name: str,
        classes: tuple[str, ...],
        default_class: str,
        capacity: Capacity,
        deployer: PoolDeployer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model_name = model_name
        self._classes = classes
        self._default_class = default_class
        self._capacity = capacity
        self._deployer = deployer
        self._clock = clock
        self._desired = DesiredState()
        self._endpoints: dict[str, dict[str, str]] = {}
        self._probe_failures: dict[str, int] = {}
        self._router_reports: dict[str, tuple[float, dict[str, int]]] = {}
        self._pool_status: dict[str, PoolStatus] = {}
        self._version = 0
        self._changed = asyncio.Event()
        self._events: deque[tuple[float, str]] = deque(maxlen=EVENT_LOG_SIZE)
        self._tasks: set[asyncio.Task[None]] = set()

    # --- desired state -------------------------------------------------------------------------------

    async def apply(self, state: DesiredState) -> int:
        """Replace the whole desired state: deploy new pools, reroute, drain pools no longer wanted."""
        self._validate(state)
        removed = [p for p in self._desired.pools if p not in state.pools]
        for pool in state.pools.values():
            await self._deploy_if_changed(pool)
        self._desired = state
        self._bump("state applied: " + ", ".join(f"{n}->{dict(w)}" for n, w in state.routes.items()))
        for pool_id in removed:
            self._start_drain(pool_id, deadline_s=60.0)
        return self._version

    async def add_pool(self, pool: PoolSpec) -> int:
        """Deploy a pool (or resize one); it takes traffic only once a route names it."""
        state = self._desired.with_pool(pool)
        self._validate(state)
        await self._deploy_if_changed(pool)
        self._desired = state
        self._bump(f"pool {pool.id}: {pool.replicas} x tp{pool.tp} requested")
        return self._version

    async def set_route(self, name: str, weights: dict[str, float]) -> int:
        state = self._desired.with_route(name, weights)
        self._validate(state)
        self._desired = state
        self._bump(f"route {name}: {weights}")
        return self._version

    async def remove_pool(self, pool_id: str, *, deadline_s: float = 60.0) -> int:
        """Take a pool out of every route now, then delete it once drained (in the background)."""
        if pool_id not in self._desired.pools:
            raise StateError(f"unknown pool {pool_id!r}")
        for name, weights in self._desired.routes.items():
            if set(weights) == {pool_id}:
                raise StateError(f"pool {pool_id!r} is the only pool of route {name!r}; route it elsewhere first")
        self._desired = self._desired.without_pool(pool_id)
        self._bump(f"pool {pool_id}: draining")
        self._start_drain(pool_id, deadline_s=deadline_s)
        return self._version

    def desired_state(self) -> DesiredState:
        return self._desired

    # --- routers -------------------------------------------------------------------------------------

    def routing_table(self) -> RoutingTable:
        self._ensure_background_tasks()
        pools = {
            pool_id: PoolView(
                id=pool_id,
                tp=pool.tp,
                replicas=pool.replicas,
                endpoints=tuple(Endpoint(r, url) for r, url in sorted(self._endpoints.get(pool_id, {}).items())),
            )
            for pool_id, pool in self._desired.pools.items()
        }
        return RoutingTable(
            version=self._version,
            model=self._model_name,
            classes=self._classes,
            default_class=self._default_class,
            routes={name: dict(w) for name, w in self._desired.routes.items()},
            pools=pools,
        )

    async def watch(self, known_version: int, timeout_s: float = 10.0) -> RoutingTable:
        """Long poll: the table as soon as its version differs from ``known_version``, else after the timeout."""
        if known_version == self._version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.routing_table()

    def report_inflight(self, router_id: str, inflight_by_pool: dict[str, int]) -> None:
        self._router_reports[router_id] = (self._clock(), dict(inflight_by_pool))

    # --- pool replicas -------------------------------------------------------------------------------

    def register_endpoint(self, pool_id: str, replica_id: str, url: str) -> None:
        if pool_id not in self._desired.pools:
            logger.warning("ignoring endpoint of unknown pool %s", pool_id)
            return
        self._endpoints.setdefault(pool_id, {})[replica_id] = url
        self._bump(f"pool {pool_id}: replica {replica_id} ready at {url}")

    def deregister_endpoint(self, pool_id: str, replica_id: str) -> None:
        if self._endpoints.get(pool_id, {}).pop(replica_id, None) is not None:
            self._bump(f"pool {pool_id}: replica {replica_id} gone")

    # --- observability -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Pools (desired vs ready replicas, phase), routes, GPU use, version and recent events."""
        self._ensure_background_tasks()
        pools = {}
        for pool_id, pool in self._desired.pools.items():
            ready = len(self._endpoints.get(pool_id, {}))
            status = self._pool_status.get(pool_id, PoolStatus("deploying"))
            pools[pool_id] = {
                "tp": pool.tp,
                "replicas": pool.replicas,
                "ready_replicas": ready,
                "gpus": pool.gpus,
                "engine": pool.engine.engine,
                "phase": "running" if ready == pool.replicas else status.phase,
                "message": status.message,
                "endpoints": dict(self._endpoints.get(pool_id, {})),
            }
        draining = {p: s.message for p, s in self._pool_status.items() if s.phase == "draining"}
        return {
            "version": self._version,
            "model": self._model_name,
            "gpus": {"budget": self._capacity.gpus, "desired": self._desired.gpus_used},
            "pools": pools,
            "draining": draining,
            "routes": {name: dict(w) for name, w in self._desired.routes.items()},
            "events": [{"age_s": round(self._clock() - t, 1), "message": m} for t, m in self._events][-50:],
        }

    def inflight_by_pool(self) -> dict[str, int]:
        """Sum of fresh router reports per pool."""
        now = self._clock()
        totals: dict[str, int] = {}
        for reported_at, counts in self._router_reports.values():
            if now - reported_at <= ROUTER_REPORT_STALE_S:
                for pool_id, n in counts.items():
                    totals[pool_id] = totals.get(pool_id, 0) + n
        return totals

    # --- internals -----------------------------------------------------------------------------------

    def _validate(self, state: DesiredState) -> None:
        for name in state.routes:
            if name not in self._classes and not name.startswith("trial-"):
                raise StateError(f"route {name!r} is neither a workload class nor a trial route (trial-...)")
        for pool_id, pool in state.pools.items():
            current = self._desired.pools.get(pool_id)
            if current is not None and current.engine != pool.engine:
                raise StateError(f"pool {pool_id!r} exists with another engine configuration; use a new pool id")
        validate_state(state, self._capacity)

    async def _deploy_if_changed(self, pool: PoolSpec) -> None:
        if self._desired.pools.get(pool.id) == pool:
            return
        self._pool_status[pool.id] = PoolStatus("deploying", f"{pool.replicas} x tp{pool.tp}")
        self._log(f"pool {pool.id}: deploying {pool.replicas} x tp{pool.tp}")
        await asyncio.to_thread(self._deployer.deploy, pool)

    def _start_drain(self, pool_id: str, *, deadline_s: float) -> None:
        self._pool_status[pool_id] = PoolStatus("draining", "waiting for in-flight requests")
        self._spawn(self._drain_and_delete(pool_id, deadline_s=deadline_s))

    async def _drain_and_delete(self, pool_id: str, *, deadline_s: float) -> None:
        started = self._clock()
        await asyncio.sleep(ROUTER_REPORT_STALE_S / 5)  # let routers see the new version and report after it
        while self._clock() - started < deadline_s:
            fresh = [
                counts.get(pool_id, 0)
                for reported_at, counts in self._router_reports.values()
                if reported_at > started and self._clock() - reported_at <= ROUTER_REPORT_STALE_S
            ]
            if fresh and not any(fresh):
                break
            if not fresh and not self._router_reports:
                break  # no router has ever reported: nothing can be in flight through one
            await asyncio.sleep(0.2)
        else:
            self._log(f"pool {pool_id}: drain deadline of {deadline_s:g} s passed, deleting anyway")
        if pool_id in self._desired.pools:  # re-added while draining
            return
        await asyncio.to_thread(self._deployer.delete, pool_id)
        self._endpoints.pop(pool_id, None)
        self._pool_status.pop(pool_id, None)
        self._bump(f"pool {pool_id}: deleted after {self._clock() - started:.1f} s")

    def _bump(self, message: str) -> None:
        self._version += 1
        self._log(message)
        self._changed.set()
        self._changed = asyncio.Event()

    def _log(self, message: str) -> None:
        self._events.append((self._clock(), message))
        logger.info(message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_background_tasks(self) -> None:
        if not getattr(self, "_background_started", False):
            self._background_started = True
            self._spawn(self._probe_endpoints_forever())
            self._spawn(self._refresh_pool_status_forever())

    async def _probe_endpoints_forever(self) -> None:
        """Drop endpoints whose engine stopped answering (a replica killed without deregistering)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while True:
                await asyncio.sleep(PROBE_PERIOD_S)
                for pool_id, replicas in list(self._endpoints.items()):
                    for replica_id, url in list(replicas.items()):
                        if await _answers(session, url):
                            self._probe_failures.pop(url, None)
                            continue
                        failures = self._probe_failures.get(url, 0) + 1
                        self._probe_failures[url] = failures
                        if failures >= PROBE_FAILURES_BEFORE_REMOVAL:
                            self._probe_failures.pop(url, None)
                            self.deregister_endpoint(pool_id, replica_id)

    async def _refresh_pool_status_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_PERIOD_S)
            try:
                statuses = await asyncio.to_thread(self._deployer.statuses)
            except Exception as exc:  # the cluster API can fail transiently; the next round retries
                logger.warning("pool status refresh failed: %s", exc)
                continue
            for pool_id, (phase, message) in statuses.items():
                current = self._pool_status.get(pool_id)
                if pool_id in self._desired.pools and (current is None or current.phase != "draining"):
                    new = PoolStatus(phase.lower(), message)
                    if current != new:
                        self._pool_status[pool_id] = new
                        self._log(f"pool {pool_id}: {new.phase} {message}".rstrip())


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/health") as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
