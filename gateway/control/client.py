"""The typed client over the controller actor: the one way the admin API, the CLI, the tuner and the routers talk
to it.

Every call has a timeout. Errors come back as these types, never as Ray's:

- :class:`StateRejected` — the change was refused (over the GPU budget, a TP the planner rejects, an unknown
  pool...); the message is the reason, fit for a person; :class:`Conflict` and :class:`NotFound` narrow it
  (a promotion in the way or no room for one; no such promotion);
- :class:`PoolFailed` — a pool could not be deployed, or its replicas failed to start (``reason`` says why);
- :class:`ControllerUnavailable` — no controller answered in time (restarting, or not running).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.control.state import PoolSpec, StateError
from gateway.dataplane.routing import RoutingTable
from gateway.planner import EngineKnobs

DEFAULT_TIMEOUT_S = 30.0
WAIT_POLL_S = 0.5
FAILED_PHASES = frozenset({"deploy_failed"})


class StateRejected(ValueError):
    """The controller refused a change; the message is the reason."""


class Conflict(StateRejected):
    """Refused because of what runs now (another promotion of the class, no room in the GPU budget)."""


class NotFound(StateRejected):
    """No such promotion."""


class PoolFailed(RuntimeError):
    """A pool could not be deployed or its replicas failed to start."""

    def __init__(self, pool_id: str, reason: str) -> None:
        super().__init__(f"pool {pool_id!r}: {reason}")
        self.pool_id = pool_id
        self.reason = reason


class ControllerUnavailable(RuntimeError):
    """No controller answered (restarting, not started, or gone)."""


@dataclass(frozen=True)
class PoolStatus:
    """One pool as the controller sees it. ``endpoints``: replica id -> engine base URL."""

    id: str
    tp: int
    replicas: int
    ready_replicas: int
    gpus: int
    phase: str  # deploying | running | deploy_failed | unhealthy | ...
    message: str
    endpoints: Mapping[str, str]
    knobs: EngineKnobs
    engine: str  # "sim" | "lmdeploy"
    time_scale: float  # how much faster than real time the engine's clock runs (1.0 for lmdeploy)

    @property
    def ready(self) -> bool:
        return self.ready_replicas >= self.replicas


@dataclass(frozen=True)
class GatewayStatus:
    """The gateway's state: pools, routes, GPU use, drains and recent events."""

    version: int
    epoch: str
    pools: Mapping[str, PoolStatus]
    routes: Mapping[str, Mapping[str, float]]
    gpus_budget: int
    gpus_used: int
    gpus_free: int
    gateway_url: str = ""
    draining: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    trial_classes: Mapping[str, str] = field(default_factory=dict)
    events: tuple[Mapping[str, Any], ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def parse_status(raw: Mapping[str, Any]) -> GatewayStatus:
    """The controller's ``status()`` dict as typed values."""
    pools = {}
    for pool_id, pool in raw["pools"].items():
        engine = pool["engine"]
        pools[pool_id] = PoolStatus(
            id=pool_id, tp=pool["tp"], replicas=pool["replicas"], ready_replicas=pool["ready_replicas"],
            gpus=pool["gpus"], phase=pool["phase"], message=pool["message"], endpoints=dict(pool["endpoints"]),
            knobs=EngineKnobs.model_validate(engine["knobs"]), engine=engine["engine"],
            time_scale=float(engine["time_scale"]) if engine["engine"] == "sim" else 1.0,
        )
    gpus = raw["gpus"]
    return GatewayStatus(
        version=raw["version"], epoch=raw["epoch"], pools=pools, routes=raw["routes"], gpus_budget=gpus["budget"],
        gpus_used=gpus["used"], gpus_free=gpus["free"], gateway_url=raw.get("gateway_url", ""),
        draining=raw.get("draining", {}), trial_classes=raw.get("trial_classes", {}),
        events=tuple(raw.get("events", ())), raw=raw,
    )


class ControlClient:
    """Async client over the controller actor (found by name in its namespace, re-resolved after a failure)."""

    def __init__(self, *, name: str, namespace: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._name = name
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._actor: Any = None

    # --- state ---------------------------------------------------------------------------------------------

    async def status(self) -> GatewayStatus:
        return parse_status(await self.raw_status())

    async def raw_status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self._call("status")
        return status

    async def describe(self) -> dict[str, Any]:
        description: dict[str, Any] = await self._call("describe")
        return description

    async def apply(self, state: Any) -> int:
        return int(await self._call("apply", state))

    async def add_pool(self, pool: PoolSpec) -> int:
        return int(await self._call("add_pool", pool))

    async def remove_pool(self, pool_id: str) -> int:
        return int(await self._call("remove_pool", pool_id))

    async def set_route(self, route: str, weights: Mapping[str, float], *, trial_class: str | None = None) -> int:
        return int(await self._call("set_route", route, dict(weights), trial_class=trial_class))

    async def remove_route(self, route: str) -> int:
        return int(await self._call("remove_route", route))

    async def wait_ready(self, pool_id: str, *, timeout_s: float) -> PoolStatus:
        """Wait until every replica of the pool is routable; :class:`PoolFailed` if it failed or went away,
        TimeoutError after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            status = await self.status()
            pool = status.pools.get(pool_id)
            if pool is None:
                raise PoolFailed(pool_id, "the pool is not (or no longer) in the desired state")
            if pool.ready:
                return pool
            if pool.phase in FAILED_PHASES:
                raise PoolFailed(pool_id, pool.message or pool.phase)
            if loop.time() >= deadline:
                raise TimeoutError(f"pool {pool_id!r}: {pool.ready_replicas}/{pool.replicas} replicas ready after "
                                   f"{timeout_s:g} s ({pool.phase}: {pool.message})")
            await asyncio.sleep(WAIT_POLL_S)

    async def records(self, section: str) -> Any:
        return await self._call("records", section)

    async def put_records(self, section: str, value: Any) -> None:
        await self._call("put_records", section, value)

    # --- promotions ----------------------------------------------------------------------------------------

    async def start_promotion(self, class_name: str, pool: PoolSpec, *, source: str, judge: bool = True
                              ) -> dict[str, Any]:
        """Move a class to a new pool in the configured steps (see ``Controller.start_promotion``)."""
        promotion: dict[str, Any] = await self._call("start_promotion", class_name, pool, source=source, judge=judge)
        return promotion

    async def promotions(self) -> list[dict[str, Any]]:
        promotions: list[dict[str, Any]] = await self._call("promotions")
        return promotions

    async def promotion(self, promotion_id: str) -> dict[str, Any]:
        promotion: dict[str, Any] = await self._call("promotion", promotion_id)
        return promotion

    async def abort_promotion(self, promotion_id: str, reason: str = "aborted by the operator") -> dict[str, Any]:
        promotion: dict[str, Any] = await self._call("abort_promotion", promotion_id, reason)
        return promotion

    async def rollback_class(self, class_name: str) -> dict[str, Any]:
        promotion: dict[str, Any] = await self._call("rollback_class", class_name)
        return promotion

    async def report_metrics(self, router_id: str, samples: Any) -> dict[str, Any]:
        """A router's series of the classes under promotion; returns what to report next (see the controller)."""
        wanted: dict[str, Any] = await self._call("report_metrics", router_id, samples)
        return wanted

    async def report_drift(self, class_name: str, report: Mapping[str, Any]) -> dict[str, Any]:
        """The drift monitor's latest verdict on a class; returns it as the controller keeps it."""
        kept: dict[str, Any] = await self._call("report_drift", class_name, dict(report))
        return kept

    async def set_stop_phase(self, phase: str) -> int:
        """The gateway is stopping (see :meth:`gateway.control.controller.Controller.set_stop_phase`)."""
        return int(await self._call("set_stop_phase", phase))

    async def inflight(self) -> dict[str, Any]:
        """Requests in flight at the live routers: ``requests``, ``routers``, ``current``."""
        inflight: dict[str, Any] = await self._call("inflight")
        return inflight

    async def owned_applications(self) -> list[str]:
        owned: list[str] = await self._call("owned_applications")
        return owned

    # --- routers -------------------------------------------------------------------------------------------

    async def watch(self, epoch: str, version: int, timeout_s: float) -> RoutingTable | None:
        table: RoutingTable | None = await self._call("watch", epoch, version, timeout_s, timeout_s=timeout_s + 5)
        return table

    async def report_inflight(self, router_id: str, epoch: str, version: int, inflight_by_pool: dict[str, int]) -> None:
        await self._call("report_inflight", router_id, epoch, version, inflight_by_pool)

    # --- internals -----------------------------------------------------------------------------------------

    def _handle(self) -> Any:
        import ray

        if self._actor is None:
            try:
                self._actor = ray.get_actor(self._name, namespace=self._namespace)
            except ValueError:
                raise ControllerUnavailable(f"no controller {self._name!r} in namespace {self._namespace!r}") from None
        return self._actor

    async def _call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        import ray

        limit_s = timeout_s or self._timeout_s
        try:
            return await asyncio.wait_for(getattr(self._handle(), method).remote(*args, **kwargs), limit_s)
        except TimeoutError:
            raise ControllerUnavailable(f"the controller did not answer {method} within {limit_s:g} s") from None
        except ray.exceptions.RayTaskError as exc:
            raise _mapped(exc) from None
        except ray.exceptions.RayError as exc:  # actor died, restarting, unavailable
            self._actor = None
            raise ControllerUnavailable(f"the controller is unavailable: {type(exc).__name__}") from None


def _mapped(exc: Any) -> Exception:
    """A controller-side exception (wrapped by Ray) as the client's own type."""
    return client_error(getattr(exc, "cause", None) or exc)


def client_error(cause: BaseException) -> Exception:
    """What the controller raised, as the client's own type."""
    from gateway.control.controller import DeployError
    from gateway.control.promotion import PromotionConflict, UnknownPromotion

    if isinstance(cause, PromotionConflict):
        return Conflict(str(cause))
    if isinstance(cause, UnknownPromotion):
        return NotFound(str(cause))
    if isinstance(cause, StateError):
        return StateRejected(str(cause))
    if isinstance(cause, DeployError):
        return PoolFailed(cause.pool_id, cause.reason)
    return RuntimeError(f"the controller failed: {cause}")
