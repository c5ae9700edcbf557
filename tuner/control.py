"""What the tuner needs of a running gateway: a typed control client (pools, routes, readiness) and the admin
token its trial traffic carries.

The gateway's ``gateway.control.client.ControlClient`` satisfies :class:`GatewayControl` as it is; tests pass
fakes. Errors are recognised by their base classes and attributes, as the client documents them:

- a refusal by the planner or the budget is a ``ValueError`` (``StateRejected``; the message is the reason);
- a pool that cannot be placed or whose engine crashed is a ``RuntimeError`` with ``pool_id`` and ``reason``
  attributes (``PoolFailed``);
- a pool not ready in time is a ``TimeoutError``;
- anything else (``ControllerUnavailable``...) is not a property of the configuration and ends the study.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import TpgateConfig
from gateway.control.state import PoolSpec
from gateway.planner import EngineKnobs


class PoolState(Protocol):
    """A pool as the controller reports it (``gateway.control.client.PoolStatus``)."""

    @property
    def id(self) -> str: ...
    @property
    def tp(self) -> int: ...
    @property
    def replicas(self) -> int: ...
    @property
    def ready_replicas(self) -> int: ...
    @property
    def gpus(self) -> int: ...
    @property
    def phase(self) -> str: ...  # deploying | running | failed | draining
    @property
    def message(self) -> str: ...
    @property
    def endpoints(self) -> Mapping[str, str]: ...  # replica id -> engine base URL
    @property
    def knobs(self) -> EngineKnobs: ...
    @property
    def engine(self) -> str: ...  # "sim" | "lmdeploy"
    @property
    def time_scale(self) -> float: ...  # sim clock speed; 1.0 for lmdeploy


class GatewayState(Protocol):
    """The controller's status (``gateway.control.client.GatewayStatus``)."""

    @property
    def version(self) -> int: ...
    @property
    def pools(self) -> Mapping[str, PoolState]: ...
    @property
    def routes(self) -> Mapping[str, Mapping[str, float]]: ...
    @property
    def gpus_budget(self) -> int: ...
    @property
    def gpus_used(self) -> int: ...
    @property
    def gpus_free(self) -> int: ...
    @property
    def gateway_url(self) -> str: ...
    @property
    def draining(self) -> Mapping[str, Mapping[str, Any]]: ...  # removed pools not gone yet: draining | deleting


class GatewayControl(Protocol):
    """The control client's calls a trial makes; every call is bounded by the client's own timeouts."""

    async def status(self) -> GatewayState: ...

    async def add_pool(self, pool: PoolSpec) -> int: ...

    async def remove_pool(self, pool_id: str) -> int: ...

    async def set_route(self, route: str, weights: Mapping[str, float], *, trial_class: str | None = None) -> int:
        """A trial route names the class it measures for (its requests are judged by that class's SLOs)."""
        ...

    async def remove_route(self, route: str) -> int: ...

    async def wait_ready(self, pool_id: str, *, timeout_s: float) -> PoolState: ...


def pool_failure_reason(exc: BaseException) -> str | None:
    """The reason of a ``PoolFailed``-shaped error (a RuntimeError with ``pool_id`` and ``reason``), else None."""
    if isinstance(exc, RuntimeError) and hasattr(exc, "pool_id") and isinstance(getattr(exc, "reason", None), str):
        return str(exc.reason)  # type: ignore[attr-defined]
    return None


@dataclass(frozen=True)
class GatewayHandle:
    """A gateway a study runs against: its control client, the admin token trial requests carry, and the
    ``/metrics`` URL of each router replica (empty: the gateway's own ``/metrics``, one router)."""

    control: GatewayControl
    admin_token: str
    router_metrics_urls: tuple[str, ...] = ()


GatewayFactory = Callable[[TpgateConfig], AbstractAsyncContextManager[GatewayHandle]]
"""Starts (or connects to) a gateway for ``tpgate tune`` and stops it when the context ends."""
