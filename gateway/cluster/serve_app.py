"""The gateway as one Ray Serve application, for clusters run with Ray Serve's own tooling (``serve deploy``,
KubeRay's ``RayService``): ``import_path: gateway.cluster.serve_app:build`` with ``args: {config: <tpgate.yaml>}``
(``deploy/serve-cluster.yaml``).

``tpgate serve`` starts Ray, the controller and the router itself and owns them while it runs. Here Serve owns the
application, built from the same tpgate configuration:

- ``control``: one replica that keeps the tpgate controller (the detached actor ``tpgate-controller``) running with
  this configuration's settings, seeds its state from the configuration when the state store is empty, and tells
  it every few seconds that its owner is alive;
- ``router``: the ingress, exactly as under ``tpgate serve``, bound to ``control`` so that Serve starts the
  controller's keeper before the first router.

Pools stay Serve applications of their own that the controller deploys and deletes (Serve's declarative config
replaces only applications it deployed itself). API keys are read from the environment of the process that builds
the application (the head node), and only their digests travel to the routers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from gateway.cluster import builders
from gateway.cluster.lifecycle import capacity_of
from gateway.cluster.runtime import ensure_admin_token, read_admin_token, resolve_api_keys
from gateway.config import load_config
from gateway.control.client import ControlClient
from gateway.control.controller import ControllerSettings
from gateway.control.initial_state import initial_state
from gateway.control.state import DesiredState
from gateway.dataplane.auth import secret_digest
from gateway.dataplane.router import Router, RouterSettings

logger = logging.getLogger("tpgate.serve_app")

APP_NAME = "tpgate"
HEARTBEAT_PERIOD_S = 5.0  # well inside the controller's owner-silence limit (30 s)


class ControlKeeper:
    """Keeps the tpgate controller of this application running, seeded and owned."""

    def __init__(self, settings: ControllerSettings, deployer: builders.ServePoolDeployer,
                 initial: DesiredState) -> None:
        self._settings, self._deployer, self._initial = settings, deployer, initial
        self._owner = f"serve application {APP_NAME} (keeper pid {os.getpid()} on {socket.gethostname()})"
        self._client = ControlClient(name=builders.CONTROLLER_NAME, namespace=builders.NAMESPACE)
        self._controller: Any = None
        self._beats: asyncio.Task[None] | None = None

    async def _ensure(self) -> None:
        controller = builders.find_controller()
        if controller is not None:
            info = await controller.describe.remote()
            if info["digest"] != self._settings.digest:  # another configuration's controller: replace it
                builders.kill_controller(controller)
                controller = None
        if controller is None:
            controller = builders.create_controller(self._settings, self._deployer)
        await controller.heartbeat.remote(self._owner)
        description = await self._client.describe()
        if not description["restored"]:
            await self._client.apply(self._initial)
        self._controller = controller

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_PERIOD_S)
            try:
                await self._controller.heartbeat.remote(self._owner)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the controller restarting: Ray brings it back, the next beat reaches it
                logger.warning("controller heartbeat failed: %s", exc)
    async def check_health(self) -> None:
        """Serve's health check: the first one makes sure the controller runs (then beats start)."""
        if self._controller is None:
            await self._ensure()
            self._beats = asyncio.create_task(self._beat_forever())


@serve.ingress()
class ClusterRouter:
    """The ingress replica: a :class:`Router` bound to the controller, started after the keeper."""

    def __init__(self, settings: RouterSettings, keeper: DeploymentHandle) -> None:
        self._settings = settings
        self._keeper = keeper

    def __serve_build_asgi_app__(self) -> Router:
        return Router(self._settings, ControlClient(name=builders.CONTROLLER_NAME, namespace=builders.NAMESPACE))


def build(args: dict[str, Any]) -> serve.Application:
    """Ray Serve application builder: ``args["config"]`` is the path of a tpgate configuration on the node that
    builds the application (``TPGATE_*`` variables of its environment override it, as for ``tpgate serve``)."""
    config_path = args.get("config")
    if not isinstance(config_path, str) or not config_path:
        raise ValueError("gateway.cluster.serve_app:build needs args: {config: <path of a tpgate configuration>}")
    config = load_config(config_path, environ=os.environ)
    admin_token = read_admin_token(ensure_admin_token(config.auth.admin_token_file))
    router_settings = builders.router_settings(config, api_key_classes=resolve_api_keys(config, os.environ),
                                               admin_digest=secret_digest(admin_token))
    capacity = capacity_of(config)
    keeper = serve.deployment(ControlKeeper, name="control", num_replicas=1,
                              ray_actor_options={"num_cpus": 0},
                              health_check_period_s=config.engine.health_check_period_s)
    router = serve.deployment(ClusterRouter, name="router", num_replicas=config.router.replicas,
                              ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=builders.ROUTER_MAX_ONGOING_REQUESTS)
    control = keeper.bind(builders.controller_settings(config, capacity),  # type: ignore[attr-defined]
                          builders.pool_deployer(config), initial_state(config, capacity))
    return router.bind(router_settings, control)  # type: ignore[attr-defined,no-any-return]
