"""The router: the gateway's ingress, a raw ASGI app (one Python hop between client and engine).

Per request: authenticate, classify (header, model alias, API key, default), pick a pool by the route's
weights, wait (bounded) for the pool's concurrency slot, pick a replica by power of two choices, and
stream the engine's response back one SSE event at a time. Before any byte reached the client a failed
attempt is retried on another replica; after that, the stream ends with an SSE error event and
``[DONE]``. A client disconnect cancels the upstream request. Every response says which class and pool served
it (``x-tpgate-class``, ``x-tpgate-pool``).

When the controller's table says the gateway is stopping, new requests get 503 (``stopping``, with Retry-After)
and ``/health`` fails while the requests in flight run on; in the ``ending`` phase (or at the router's shutdown)
those are ended too: a stream with a last SSE error event and ``[DONE]``, a request not yet answered with 503.
On the HAProxy fast path its latency figures count from the front door (:mod:`gateway.dataplane.front`); with
``router.metrics_targets_dir`` each replica also serves its own ``/metrics`` for Prometheus
(:mod:`gateway.dataplane.metrics_targets`).

The router lists the paths it serves as ``routes`` in the shape Ray Serve reads from an ASGI app, so Serve's
access log and request metrics name the path (``POST /v1/chat/completions``) instead of the route prefix ``/``.

The router follows the controller's versioned :class:`RoutingTable` in the background and never waits
on the controller while serving a request: when the controller is away (restarting), it keeps serving on the
last table, and takes a restarted controller's table (a new epoch) whatever its version. Every half second it
reports to the controller, per pool, the requests in flight or waiting at the pool's gate, with the table
(epoch, version) it counted under: that is how a pool is drained without cutting a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from starlette.routing import Match

from gateway.dataplane.asgi import (
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_bytes,
    send_error,
    send_json,
)
from gateway.dataplane.auth import authorize, require_admin
from gateway.dataplane.bodies import parse_json_object
from gateway.dataplane.front import FRONT_RECEIVED_HEADER, front_wait_s
from gateway.dataplane.gate import ConcurrencyGate
from gateway.dataplane.metrics import NO_CLASS, NO_POOL, ClassSeries, GatewayMetrics
from gateway.dataplane.metrics_targets import MetricsTarget
from gateway.dataplane.relay import Outcome, RelayOptions, relay_stream, relay_whole, until_disconnect
from gateway.dataplane.routing import (
    CLASS_HEADER,
    Endpoint,
    PoolView,
    RoutingTable,
    choose_pool,
    choose_replica,
    classify,
    served_models,
)
from gateway.dataplane.upstream import (
    DONE_EVENT,
    EVENT_SEPARATOR,
    Timeouts,
    UpstreamFailure,
    new_session,
    post,
    with_usage_requested,
)
from gateway.errors import ApiError

logger = logging.getLogger("tpgate.router")

SUSPECT_FOR_S = 5.0  # a replica that refused a connection is avoided this long, or until the table changes
REPORT_PERIOD_S = 0.5
WATCH_TIMEOUT_S = 10.0
CONTROLLER_RETRY_S = 1.0
CLIENT_CLOSED = "499"
CLASS_RESPONSE_HEADER = b"x-tpgate-class"
POOL_RESPONSE_HEADER = b"x-tpgate-pool"
STOPPING_MESSAGE = "the gateway is stopping"
STOPPED_STATUS = "503"  # the status recorded for a request the gateway ended because it stops
FRONT_STAMP = FRONT_RECEIVED_HEADER.encode()
ADMIN_PREFIX = "/admin/"
ENGINE_METRICS_PATH = "/admin/engine-metrics"  # an engine's /metrics relayed with its pool's key
ENGINE_METRICS_TIMEOUT_S = 10.0


class AdminSurface(Protocol):
    """What the router serves under ``/admin`` besides ``/admin/status`` (:mod:`gateway.admin`): an ASGI app that
    lives as long as the router."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ControlPlane(Protocol):
    """The router's view of the controller (a Ray actor in production)."""

    async def watch(self, epoch: str, version: int, timeout_s: float) -> RoutingTable | None:
        """The table once it differs from (epoch, version); None when nothing changed in ``timeout_s``."""
        ...

    async def report_inflight(self, router_id: str, epoch: str, version: int, inflight_by_pool: dict[str, int]) -> None:
        ...

    async def raw_status(self) -> dict[str, Any]:
        """The controller's status as plain JSON-safe values."""
        ...


@dataclass(frozen=True)
class RouterSettings:
    timeouts: Timeouts
    max_inflight_per_replica: int = 512
    queue_timeout_s: float = 2.0
    max_attempts: int = 3
    max_body_bytes: int = 8 * 1024 * 1024
    body_read_timeout_s: float = 30.0
    max_json_depth: int = 64
    retry_after_s: int = 1
    api_key_classes: Mapping[str, str | None] = field(default_factory=dict)  # key digest -> default class
    admin_token_digest: str | None = None
    # the front (HAProxy) stamps requests with FRONT_RECEIVED_HEADER: count latency from there
    front_stamps: bool = False
    # write a Prometheus file-SD target file here and serve /metrics on a port of this replica's own
    metrics_targets_dir: str | None = None
    metrics_host: str = "127.0.0.1"


@dataclass
class _Request:
    """What the router learnt of one proxied request so far (for its metrics and response headers)."""

    route: str = NO_CLASS
    front_wait_s: float | None = None  # from the front door receiving it to the router starting on it
    outcome: Outcome = field(default_factory=Outcome)
    stream: bool = False
    ended: bool = False  # the router ended it because the gateway stops
    class_series: ClassSeries | None = None  # its class's live-profile series, once classified


class ServedPath:
    """One path the router serves, in the shape Ray Serve reads an ASGI app's ``routes`` in (Starlette's
    ``Route``: ``path``, ``methods``, ``matches(scope)``), so that Serve's access log and request metrics name the
    path. Matching is one string comparison."""

    __slots__ = ("methods", "path")

    def __init__(self, path: str, methods: set[str]) -> None:
        self.path = path
        self.methods = methods

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return (Match.FULL if scope.get("path") == self.path else Match.NONE), {}


class Router:
    """ASGI app. Owns its aiohttp session and background tasks through the ASGI lifespan."""

    def __init__(
        self,
        settings: RouterSettings,
        control: ControlPlane,
        *,
        metrics: GatewayMetrics | None = None,
        rng: random.Random | None = None,
        router_id: str | None = None,
        admin: AdminSurface | None = None,
    ) -> None:
        self._settings = settings
        self._admin = admin
        self._control = control
        self.metrics = metrics or GatewayMetrics()
        self._rng = rng or random.Random()
        self._router_id = router_id or uuid.uuid4().hex[:12]
        self._table = RoutingTable()
        self._gates: dict[str, ConcurrencyGate] = {}
        self._inflight_by_replica: dict[str, int] = {}
        self._suspect_until: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_target: MetricsTarget | None = None
        self._table_ready = asyncio.Event()
        self._active: dict[asyncio.Task[Any], _Request] = {}  # proxied requests in flight, by their task
        self._handlers: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._proxy,
            ("POST", "/v1/completions"): self._proxy,
            ("GET", "/v1/models"): self._models,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/health"): self._health,
            ("GET", "/admin/status"): self._admin_status,
            ("GET", "/admin/engine-targets"): self._engine_targets,
            ("GET", ENGINE_METRICS_PATH): self._engine_metrics,
        }
        self._paths = {path for _, path in self._handlers}
        # in the handlers' order, the hot paths first: Serve tries them in turn on every request
        self.routes = [ServedPath(path, {m for m, p in self._handlers if p == path})
                       for path in dict.fromkeys(path for _, path in self._handlers)]

    @property
    def table(self) -> RoutingTable:
        return self._table

    # --- ASGI -----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        handler = self._handlers.get((scope["method"], scope["path"]))
        if handler is None and self._admin is not None and scope["path"].startswith(ADMIN_PREFIX):
            await self._admin(scope, receive, send)
            return
        try:
            if handler is None:
                if scope["path"] in self._paths:
                    raise ApiError(405, f"method {scope['method']} is not allowed on {scope['path']}")
                raise ApiError(404, f"no route for {scope['method']} {scope['path']}")
            await handler(scope, receive, send)
        except ApiError as error:
            await send_error(send, error)
        except ClientDisconnected:
            return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        self._session = new_session()
        self._tasks = [asyncio.create_task(self._follow_controller()), asyncio.create_task(self._report_forever())]
        if self._settings.metrics_targets_dir is not None:
            target = MetricsTarget(self._settings.metrics_targets_dir, host=self._settings.metrics_host,
                                   router_id=self._router_id, exposition=self.metrics.exposition)
            await target.start()
            self._metrics_target = target
        if self._admin is not None:
            await self._admin.start()

    async def stop(self) -> None:
        self._end_inflight()
        if self._admin is not None:
            await self._admin.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        if self._metrics_target is not None:
            await self._metrics_target.stop()

    async def wait_for_table(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._table_ready.wait(), timeout_s)

    # --- following the controller -----------------------------------------------------------------------

    async def _follow_controller(self) -> None:
        while True:
            try:
                table = await self._control.watch(self._table.epoch, self._table.version, WATCH_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the controller restarting must not stop the router; keep the last table
                logger.warning("controller watch failed, serving on table v%d: %s", self._table.version, exc)
                await asyncio.sleep(CONTROLLER_RETRY_S)
                continue
            if table is not None and (table.epoch, table.version) != (self._table.epoch, self._table.version):
                self.apply_table(table)

    def apply_table(self, table: RoutingTable) -> None:
        self._table = table
        self._suspect_until.clear()
        per_replica = self._settings.max_inflight_per_replica
        for pool in table.pools.values():
            limit = max(1, len(pool.endpoints)) * per_replica
            gate = self._gates.get(pool.id)
            if gate is None:
                self._gates[pool.id] = ConcurrencyGate(limit)
            else:
                gate.set_limit(limit)
        self._publish_table_metrics(table)
        self._forget_gone_pools()
        self._table_ready.set()
        if table.stop_phase == "ending":
            self._end_inflight()

    def _end_inflight(self) -> None:
        """End every proxied request in flight (each ends itself in :meth:`_proxy`, answering its client)."""
        for task, request in self._active.items():
            if not request.ended:
                request.ended = True
                task.cancel()

    def _forget_gone_pools(self) -> None:
        """Drop gates and metric series of pools and routes that left the table, once nothing uses them."""
        table = self._table
        for pool_id, gate in list(self._gates.items()):
            if pool_id not in table.pools and gate.inflight == 0 and gate.waiting == 0:
                del self._gates[pool_id]
        self.metrics.forget(routes=set(table.routes), pools=set(table.pools) | set(self._gates))

    def _publish_table_metrics(self, table: RoutingTable) -> None:
        m = self.metrics
        m.state_version.set(table.version)
        m.route_weight.clear()
        for route, weights in table.routes.items():
            for pool_id, weight in weights.items():
                m.route_weight.labels(route, pool_id).set(weight)
        m.pool_replicas.clear()
        m.pool_desired_replicas.clear()
        for pool in table.pools.values():
            m.pool_replicas.labels(pool.id, str(pool.tp)).set(len(pool.endpoints))
            m.pool_desired_replicas.labels(pool.id, str(pool.tp)).set(pool.replicas)

    async def _report_forever(self) -> None:
        while True:
            table = self._table
            counts = {pool_id: gate.inflight + gate.waiting for pool_id, gate in self._gates.items()}
            if any(pool_id not in table.pools for pool_id in self._gates):
                self._forget_gone_pools()
            if table.published:
                try:
                    await self._control.report_inflight(self._router_id, table.epoch, table.version, counts)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # reporting is best effort; draining waits for the next report
                    logger.warning("in-flight report failed: %s", exc)
            await asyncio.sleep(REPORT_PERIOD_S)

    # --- endpoints ------------------------------------------------------------------------------------

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorize(scope, self._settings.api_key_classes, self._settings.admin_token_digest)
        self._require_table()
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "tpgate", "simulated": simulated}
                for model, simulated in served_models(self._table)]
        await send_json(send, 200, {"object": "list", "data": data})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self.metrics.exposition(), [(b"content-type", b"text/plain; version=0.0.4")])

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """200 when every workload class has a healthy replica; trial routes do not count."""
        table = self._table
        if not table.published or table.stop_phase:
            reason = STOPPING_MESSAGE if table.stop_phase else "no routing table from the controller yet"
            await send_json(send, 503, {"healthy": False, "reason": reason},
                            extra_headers=[("Retry-After", str(self._settings.retry_after_s))])
            return
        serving = {route: any(table.pools[p].endpoints for p in weights if p in table.pools)
                   for route, weights in table.production_routes().items()}
        healthy = bool(serving) and all(serving.values())
        await send_json(send, 200 if healthy else 503, {"healthy": healthy, "routes": serving,
                                                        "version": table.version})

    async def _admin_status(self, scope: Scope, receive: Receive, send: Send) -> None:
        require_admin(scope, self._settings.admin_token_digest)
        await send_json(send, 200, await self._control.raw_status())

    async def _engine_targets(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The engines to scrape, in Prometheus' HTTP service-discovery format (``http_sd_configs``), labelled
        with their pool and replica: Prometheus follows pools as they come and go (admin token). An engine that
        requires its pool's key is scraped through this gateway (:meth:`_engine_metrics`), which holds the key."""
        require_admin(scope, self._settings.admin_token_digest)
        await send_json(send, 200, engine_targets(self._table, gateway_address=header(scope, b"host") or ""))

    async def _engine_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``?pool=P&replica=R``: that engine's ``/metrics``, fetched with its pool's key (admin token)."""
        require_admin(scope, self._settings.admin_token_digest)
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        pool = self._table.pools.get((query.get("pool") or [""])[0])
        replica = (query.get("replica") or [""])[0]
        endpoint = next((e for e in pool.endpoints if e.replica_id == replica), None) if pool is not None else None
        if pool is None or endpoint is None:
            raise ApiError(404, "no such engine replica in the routing table", param="replica")
        assert self._session is not None, "router used before its lifespan started"
        headers = {} if pool.api_key is None else {"authorization": f"Bearer {pool.api_key}"}
        try:
            async with self._session.get(endpoint.url + "/metrics", headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=ENGINE_METRICS_TIMEOUT_S)) as resp:
                body, status = await resp.read(), resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(502, f"engine {replica} of pool {pool.id} did not answer /metrics: {exc!r}") from None
        if status != 200:
            raise ApiError(502, f"engine {replica} of pool {pool.id} answered /metrics with {status}")
        await send_bytes(send, 200, body, [(b"content-type", b"text/plain; version=0.0.4")])

    def _require_table(self) -> None:
        if not self._table.published:
            raise ApiError(503, "the gateway is starting: it has no routing table yet", code="starting",
                           headers={"Retry-After": str(self._settings.retry_after_s)})
        if self._table.stop_phase:
            raise self._stopping_error()

    def _stopping_error(self) -> ApiError:
        return ApiError(503, STOPPING_MESSAGE, code="stopping",
                        headers={"Retry-After": str(self._settings.retry_after_s)})

    # --- the proxy ------------------------------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = _Request()
        if self._settings.front_stamps:
            request.front_wait_s = front_wait_s(header(scope, FRONT_STAMP), now_unix_s=time.time())
            if request.front_wait_s is not None:
                started -= request.front_wait_s  # latency counts from the front door
        task = asyncio.current_task()
        assert task is not None
        self._active[task] = request
        try:
            await self._serve(scope, receive, send, request)
        except ApiError as error:
            request.outcome.status = str(error.status)
            await send_error(send, error, extra_headers=_served_by(request))
        except ClientDisconnected:
            request.outcome.status = CLIENT_CLOSED
        except asyncio.CancelledError:
            if not request.ended:
                raise
            task.uncancel()
            await self._send_ended(send, request)
        finally:
            del self._active[task]
            if request.class_series is not None:
                request.class_series.inflight.dec()
            self._record(request, started)

    async def _send_ended(self, send: Send, request: _Request) -> None:
        """Answer a request the router ended because the gateway stops: a stream gets a last error event and
        ``[DONE]``, a request not yet answered a 503; a whole response already on its way is left to finish."""
        outcome = request.outcome
        error = self._stopping_error()
        if not outcome.started:
            outcome.status = STOPPED_STATUS
            await send_error(send, error, extra_headers=_served_by(request))
        elif request.stream and outcome.status == "200":  # an SSE stream (an engine error comes whole)
            outcome.status = STOPPED_STATUS
            event = b"data: " + json.dumps(error.body()).encode() + EVENT_SEPARATOR + DONE_EVENT
            await send({"type": "http.response.body", "body": event, "more_body": False})

    async def _serve(self, scope: Scope, receive: Receive, send: Send, request: _Request) -> None:
        caller = authorize(scope, self._settings.api_key_classes, self._settings.admin_token_digest)
        body = await read_body(scope, receive, limit_bytes=self._settings.max_body_bytes,
                               timeout_s=self._settings.body_read_timeout_s)
        payload = parse_json_object(body, max_depth=self._settings.max_json_depth)
        self._require_table()
        table = self._table
        route = classify(table, model=payload.get("model"), header_class=header(scope, CLASS_HEADER.encode()),
                         key_class=caller.key_class, trial_allowed=caller.admin)
        request.route = route.route
        stream = request.stream = payload.get("stream") is True
        request.class_series = self.metrics.class_series(route.route)
        request.class_series.arrived(scope["path"], stream)
        forward_usage = True
        if stream:
            payload, forward_usage = with_usage_requested(payload)
        if route.rewritten:
            payload["model"] = route.upstream_model
        if route.rewritten or not forward_usage:
            body = json.dumps(payload).encode()
        await until_disconnect(
            receive, self._forward(table, route.route, scope["path"], body, stream, forward_usage, send, request)
        )

    async def _forward(
        self, table: RoutingTable, route: str, path: str, body: bytes, stream: bool, forward_usage: bool,
        send: Send, request: _Request,
    ) -> None:
        weights = table.routes[route]
        outcome = request.outcome
        tried_pools: set[str] = set()
        tried_replicas: set[str] = set()
        attempts = 0
        last_failure: UpstreamFailure | None = None
        while attempts < self._settings.max_attempts:
            pool = choose_pool(weights, table.pools, self._rng, exclude=tried_pools)
            if pool is None:
                break
            gate = self._gates[pool.id]
            outcome.pool = pool.id
            waited_from = time.perf_counter()
            if not await gate.acquire(self._settings.queue_timeout_s if attempts == 0 else 0.0):
                if attempts:
                    tried_pools.add(pool.id)
                    continue
                raise ApiError(
                    429,
                    f"pool '{pool.id}' of class '{route}' has {gate.inflight} requests in flight, its limit; "
                    f"retry after {self._settings.retry_after_s} s",
                    code="overloaded",
                    headers={"Retry-After": str(self._settings.retry_after_s)},
                )
            self.metrics.series(route, pool.id).queue_wait.observe(time.perf_counter() - waited_from)
            try:
                while attempts < self._settings.max_attempts:
                    endpoint = self._pick_replica(pool, tried_replicas)
                    if endpoint is None:
                        break
                    attempts += 1
                    tried_replicas.add(endpoint.replica_id)
                    try:
                        await self._attempt(pool, endpoint, path, body, stream, forward_usage, send, request)
                        return
                    except UpstreamFailure as failure:
                        self.metrics.count_upstream_error(pool.id, failure.reason)
                        last_failure = failure
                        if not failure.retryable:
                            raise ApiError(504 if failure.reason == "timeout" else 502, str(failure)) from None
                        if failure.reason == "connect":
                            self._suspect_until[endpoint.replica_id] = time.monotonic() + SUSPECT_FOR_S
                        if attempts < self._settings.max_attempts:
                            self.metrics.count_retry(pool.id)
            finally:
                gate.release()
            tried_pools.add(pool.id)
        outcome.pool = NO_POOL if last_failure is None else outcome.pool
        if last_failure is not None:
            raise ApiError(502, f"no engine replica could serve the request: {last_failure}")
        raise ApiError(503, f"no healthy engine replica for class '{route}'", code="no_healthy_replica",
                       headers={"Retry-After": str(self._settings.retry_after_s)})

    def _pick_replica(self, pool: PoolView, tried: set[str]) -> Endpoint | None:
        now = time.monotonic()
        suspects = {r for r, until in self._suspect_until.items() if until > now}
        endpoint = choose_replica(pool.endpoints, self._inflight_by_replica, self._rng, exclude=tried | suspects)
        return endpoint or choose_replica(pool.endpoints, self._inflight_by_replica, self._rng, exclude=tried)

    async def _attempt(
        self, pool: PoolView, endpoint: Endpoint, path: str, body: bytes, stream: bool, forward_usage: bool,
        send: Send, request: _Request,
    ) -> None:
        assert self._session is not None, "router used before its lifespan started"
        replica = endpoint.replica_id
        self._inflight_by_replica[replica] = self._inflight_by_replica.get(replica, 0) + 1
        gauge = self.metrics.inflight_gauge(pool.id, replica)
        gauge.inc()
        timeouts = self._settings.timeouts
        options = RelayOptions(
            headers=[(CLASS_RESPONSE_HEADER, request.route.encode()), (POOL_RESPONSE_HEADER, pool.id.encode())],
            forward_usage=forward_usage,
            first_byte_deadline=asyncio.get_running_loop().time() + timeouts.first_byte_s,
            idle_s=timeouts.idle_s,
        )
        try:
            resp = await post(self._session, endpoint.url + path, body, timeouts,
                              first_byte_deadline=options.first_byte_deadline, api_key=pool.api_key)
            if stream and resp.status == 200:
                await relay_stream(resp, send, request.outcome, options)
            else:
                await relay_whole(resp, send, request.outcome, options)
        finally:
            self._inflight_by_replica[replica] -= 1
            gauge.dec()

    def _record(self, request: _Request, started: float) -> None:
        outcome = request.outcome
        series = self.metrics.series(request.route, outcome.pool)
        series.requests(outcome.status).inc()
        if request.front_wait_s is not None:
            series.front_wait.observe(request.front_wait_s)
        if outcome.status != "200":
            return
        e2e_s = time.perf_counter() - started
        series.request_duration.observe(e2e_s)
        tokens = outcome.output_tokens or outcome.content_events
        series.output_tokens.inc(tokens)
        series.prompt_tokens.inc(outcome.prompt_tokens)
        if request.class_series is not None:
            if outcome.prompt_tokens:
                request.class_series.prompt_length.observe(outcome.prompt_tokens)
            request.class_series.output_length.observe(tokens)
        ttft_s = tpot_s = None
        if outcome.first_token_at is not None:
            ttft_s = outcome.first_token_at - started
            series.time_to_first_token.observe(ttft_s)
            if outcome.last_token_at is not None and tokens > 1:
                tpot_s = (outcome.last_token_at - outcome.first_token_at) / (tokens - 1)
                series.time_per_output_token.observe(tpot_s)
        slo = self._table.slos.get(request.route)
        pool = self._table.pools.get(outcome.pool)
        if slo is not None:
            scale = pool.time_scale if pool is not None else 1.0
            if slo.met(ttft_s=None if ttft_s is None else ttft_s * scale,
                       tpot_s=None if tpot_s is None else tpot_s * scale, e2e_s=e2e_s * scale):
                series.slo_met.inc()


def engine_targets(table: RoutingTable, *, gateway_address: str) -> list[dict[str, Any]]:
    """One Prometheus HTTP SD target group per healthy engine replica: the engine itself, or — for a pool whose
    engines require its key, which Prometheus does not hold — this gateway's :data:`ENGINE_METRICS_PATH`, reached
    at ``gateway_address`` (where Prometheus found the targets)."""
    groups = []
    for pool in table.pools.values():
        for endpoint in pool.endpoints:
            engine = endpoint.url.split("://", 1)[-1]
            labels = {"pool": pool.id, "replica": endpoint.replica_id, "tp": str(pool.tp), "engine": engine}
            if pool.api_key is None:
                groups.append({"targets": [engine], "labels": labels})
            else:
                groups.append({"targets": [gateway_address], "labels": {
                    **labels, "__metrics_path__": ENGINE_METRICS_PATH, "__param_pool": pool.id,
                    "__param_replica": endpoint.replica_id}})
    return groups


def _served_by(request: _Request) -> list[tuple[str, str]]:
    headers = [] if request.route == NO_CLASS else [(CLASS_RESPONSE_HEADER.decode(), request.route)]
    if request.outcome.pool != NO_POOL:
        headers.append((POOL_RESPONSE_HEADER.decode(), request.outcome.pool))
    return headers
