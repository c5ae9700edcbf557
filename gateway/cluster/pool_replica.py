"""Engine pool replica: a Serve deployment whose every replica supervises one engine process.

Each replica reserves ``num_gpus=tp`` from Ray (``num_cpus=0``): Ray picks the devices, and the engine
inherits them through ``CUDA_VISIBLE_DEVICES``. The replica registers its engine's URL with the controller
once the engine is healthy and deregisters on shutdown; Serve's health check fails when the engine dies,
so Serve replaces the replica. Requests never pass through this class: routers talk to the engine's HTTP
endpoint directly.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import aiohttp
import ray
from ray import serve

from gateway.cluster.engine_process import EngineProcess
from gateway.cluster.procutil import free_loopback_port
from gateway.engines import get_launcher
from gateway.engines.base import EngineSpec

logger = logging.getLogger("ray.serve")

ENGINE_HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 5.0


class EnginePoolReplica:
    """Starts the engine, reports it to the controller, and stops it with the replica."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        pool_id: str,
        spec: EngineSpec,
        *,
        controller_name: str,
        namespace: str,
        startup_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self._pool_id = pool_id
        self._stop_timeout_s = stop_timeout_s
        self._registered = False
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._controller = ray.get_actor(controller_name, namespace=namespace)
        self._session = aiohttp.ClientSession()
        launcher = get_launcher(spec.engine)
        gpu_ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        port = free_loopback_port()
        url = f"http://{ENGINE_HOST}:{port}"
        argv = launcher.command(spec, host=ENGINE_HOST, port=port)
        self._engine = await EngineProcess.start(argv, url=url, env=launcher.environment(spec, gpu_ids=gpu_ids))
        logger.info("pool %s: engine pid %d on %s, GPUs %s", pool_id, self._engine.pid, url, gpu_ids)
        try:
            await self._engine.wait_healthy(self._session, timeout_s=startup_timeout_s)
        except BaseException:
            await self._shutdown()
            raise
        await self._controller.register_endpoint.remote(pool_id, self._replica_id, url)
        self._registered = True

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if await self._engine.healthy(self._session, timeout_s=HEALTH_TIMEOUT_S):
            return
        await self._deregister()
        if self._engine.exit_code is not None:
            raise RuntimeError(f"engine pid {self._engine.pid} exited with status {self._engine.exit_code}")
        raise RuntimeError(f"engine at {self._engine.url} does not answer /health")

    async def describe(self) -> dict[str, Any]:
        return {"pool": self._pool_id, "replica": self._replica_id, "url": self._engine.url, "pid": self._engine.pid}

    async def __del__(self) -> None:
        await self._shutdown()

    async def _deregister(self) -> None:
        if self._registered:
            self._registered = False
            await self._controller.deregister_endpoint.remote(self._pool_id, self._replica_id)

    async def _shutdown(self) -> None:
        try:
            with contextlib.suppress(ray.exceptions.RayError):  # the controller may be gone already
                await self._deregister()
        finally:
            if hasattr(self, "_engine"):
                await self._engine.stop(timeout_s=self._stop_timeout_s)
            await self._session.close()
