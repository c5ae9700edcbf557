"""Engine pool replica: a Serve deployment whose every replica supervises one engine process.

Each replica reserves ``num_gpus=tp`` from Ray (``num_cpus=0``): Ray picks the devices, and the engine
inherits them through ``CUDA_VISIBLE_DEVICES``. Registration is level-triggered: on every health check Serve
makes, the replica tells the controller "my engine is healthy at URL" (or that it is not), so an endpoint
that left routing after a slow probe, or while the controller restarted, comes back by itself. Serve's health
check fails when the engine does not answer, and after three failures in a row Serve replaces the replica.
Requests never pass through this class: routers talk to the engine's HTTP endpoint directly.

The engine listens on ``host``: loopback on one node; on a cluster (``engine.host: auto``) the node's own address,
so that routers on other nodes reach it, with the pool's key (``api_key``, LMDeploy's ``--api-keys``) required on
every path but ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import ray
from ray import serve

from gateway.cluster.engine_process import EngineProcess
from gateway.cluster.procutil import free_port
from gateway.config import LOOPBACK_ENGINE_HOST
from gateway.engines import get_launcher
from gateway.engines.base import EngineSpec

logger = logging.getLogger("ray.serve")

AUTO_HOST = "auto"  # the node's own address, as Ray knows it
HEALTH_TIMEOUT_S = 5.0
CONTROLLER_CALL_TIMEOUT_S = 2.0


class Engine(Protocol):
    url: str

    @property
    def exit_code(self) -> int | None: ...

    async def healthy(self, session: aiohttp.ClientSession, *, timeout_s: float) -> bool: ...


Registrar = Callable[[str], Awaitable[None]]  # called with the engine URL


class ControllerAway(Exception):
    """The controller could not be told (restarting, or gone while the gateway stops)."""


class EngineHealth:
    """One health check of a replica's engine, and what the controller is told about it.

    Healthy: the endpoint is asserted (every time: the controller's view converges from repeated statements).
    Not healthy: the endpoint is retracted and the check raises, so Serve counts a failure. Calls to the
    controller never fail the check: while the controller is away, the next check says it again.
    """

    def __init__(self, engine: Engine, session: aiohttp.ClientSession, *, register: Registrar,
                 deregister: Registrar) -> None:
        self._engine = engine
        self._session = session
        self._register = register
        self._deregister = deregister

    async def check(self) -> None:
        engine = self._engine
        if await engine.healthy(self._session, timeout_s=HEALTH_TIMEOUT_S):
            await self._tell(self._register)
            return
        await self._tell(self._deregister)
        if engine.exit_code is not None:
            raise RuntimeError(f"engine at {engine.url} exited with status {engine.exit_code}")
        raise RuntimeError(f"engine at {engine.url} does not answer /health")

    async def _tell(self, call: Registrar) -> None:
        try:
            await asyncio.wait_for(call(self._engine.url), CONTROLLER_CALL_TIMEOUT_S)
        except (ControllerAway, TimeoutError) as exc:
            logger.warning("controller unavailable (%s); telling it again at the next health check", exc)


class EnginePoolReplica:
    """Starts the engine, reports it to the controller on every health check, and stops it with the replica."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        pool_id: str,
        spec: EngineSpec,
        *,
        controller_name: str,
        namespace: str,
        startup_timeout_s: float,
        stop_timeout_s: float,
        host: str = LOOPBACK_ENGINE_HOST,
        api_key: str | None = None,
    ) -> None:
        self._pool_id = pool_id
        self._stop_timeout_s = stop_timeout_s
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._controller_name = controller_name
        self._namespace = namespace
        self._controller: Any = None
        self._session = aiohttp.ClientSession()
        launcher = get_launcher(spec.engine)
        gpu_ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        host = ray.util.get_node_ip_address() if host == AUTO_HOST else host
        port = free_port(host)
        url = f"http://{host}:{port}"
        argv = launcher.command(spec, host=host, port=port, api_key=api_key)
        self._engine = await EngineProcess.start(argv, url=url, env=launcher.environment(spec, gpu_ids=gpu_ids))
        logger.info("pool %s: engine pid %d on %s, GPUs %s", pool_id, self._engine.pid, url, gpu_ids)
        try:
            await self._engine.wait_healthy(self._session, timeout_s=startup_timeout_s)
        except BaseException:
            await self._shutdown()
            raise
        self._health = EngineHealth(self._engine, self._session, register=self._register,
                                    deregister=self._deregister)
        await self._health.check()

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve count a failure (three in a row: replaced)."""
        await self._health.check()

    async def describe(self) -> dict[str, Any]:
        return {"pool": self._pool_id, "replica": self._replica_id, "url": self._engine.url, "pid": self._engine.pid}

    async def __del__(self) -> None:
        await self._shutdown()

    def _handle(self) -> Any:
        if self._controller is None:
            self._controller = ray.get_actor(self._controller_name, namespace=self._namespace)
        return self._controller

    async def _register(self, url: str) -> None:
        await self._call("register_endpoint", self._pool_id, self._replica_id, url)

    async def _deregister(self, url: str) -> None:
        await self._call("deregister_endpoint", self._pool_id, self._replica_id)

    async def _call(self, method: str, *args: str) -> None:
        try:
            await getattr(self._handle(), method).remote(*args)
        except (ray.exceptions.RayError, ValueError) as exc:  # ValueError: no such actor (the gateway stops)
            self._controller = None  # re-resolve next time: a controller created anew has a new handle
            raise ControllerAway(str(exc)) from None

    async def _shutdown(self) -> None:
        try:
            if hasattr(self, "_engine"):
                await EngineHealth(self._engine, self._session, register=self._register,
                                   deregister=self._deregister)._tell(self._deregister)
        finally:
            if hasattr(self, "_engine"):
                await self._engine.stop(timeout_s=self._stop_timeout_s)
            await self._session.close()
