"""The admin surface a router replica serves under ``/admin``: the admin API behind the bearer token, and the
router's metrics reports to the controller (:mod:`gateway.admin.reporter`).

Every path under ``/admin`` — each route, the OpenAPI schema, an unknown path — is checked first: no token is
401, a wrong one 403 (compared in constant time, as digests); only then does the request reach the API.
"""

from __future__ import annotations

from typing import Any

from gateway.admin.reporter import MetricsReporter, MetricsSink
from gateway.dataplane.asgi import Receive, Scope, Send, send_error
from gateway.dataplane.auth import require_admin
from gateway.dataplane.metrics import GatewayMetrics
from gateway.errors import ApiError


class AdminSurface:
    """An ASGI app for ``/admin/...`` with a lifetime (the router starts and stops it with its own)."""

    def __init__(self, app: Any, *, admin_digest: str | None, metrics: GatewayMetrics, sink: MetricsSink) -> None:
        self._app = app
        self._admin_digest = admin_digest
        self.reporter = MetricsReporter(metrics, sink)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan, when served on its own (the router never passes it on)
            await self._app(scope, receive, send)
            return
        try:
            require_admin(scope, self._admin_digest)
        except ApiError as error:
            await send_error(send, error)
            return
        await self._app(scope, receive, send)

    async def start(self) -> None:
        await self.reporter.start()

    async def stop(self) -> None:
        await self.reporter.stop()


def build_surface(config: Any, *, admin_digest: str, metrics: GatewayMetrics) -> AdminSurface:
    """The admin surface of a router replica in the cluster: the API over the controller and the tuning service
    (both found by name), reporting to the controller."""
    from gateway.admin.app import build_app
    from gateway.admin.tuning_client import TuningClient
    from gateway.cluster.lifecycle import capacity_of
    from gateway.cluster.tuning_service import TUNING_SERVICE_NAME
    from gateway.control.client import ControlClient
    from gateway.control.controller import CONTROLLER_NAME, NAMESPACE

    control = ControlClient(name=CONTROLLER_NAME, namespace=NAMESPACE)
    tuning = TuningClient(name=TUNING_SERVICE_NAME, namespace=NAMESPACE)
    app = build_app(config, capacity_of(config), control, tuning)
    return AdminSurface(app, admin_digest=admin_digest, metrics=metrics, sink=control)
