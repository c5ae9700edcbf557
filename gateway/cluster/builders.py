"""Builders: the only place that turns tpgate's plain classes into Ray actors and Serve deployments.

- the controller: a named, detached Ray actor (:data:`CONTROLLER_NAME` in :data:`NAMESPACE`);
- the router: Serve application ``tpgate`` (the HTTP ingress at ``/``);
- each engine pool: its own Serve application ``pool-<id>`` with no HTTP route, added and deleted
  without touching the router's application;
- the tuning service: a named Ray actor (:data:`TUNING_SERVICE_NAME`), owned by the ``tpgate serve`` that
  starts it, where online studies run (one per gateway, whichever router replica the admin call landed on).
Every deployment asks for ``num_cpus=0``: on a 2-core machine the default of one CPU per replica
leaves replicas unscheduled.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gateway.cluster.pool_replica import EnginePoolReplica
from gateway.cluster.runtime import engine_key_seed
from gateway.cluster.serve_env import router_env_vars
from gateway.cluster.tuning_service import TUNING_SERVICE_NAME, TuningService
from gateway.config import LOOPBACK_ENGINE_HOST, TpgateConfig
from gateway.control.client import ControlClient
from gateway.control.controller import CONTROLLER_NAME, NAMESPACE, Controller, ControllerSettings
from gateway.control.promotion import PromotionPolicy
from gateway.control.state import Capacity, PoolSpec
from gateway.dataplane.auth import engine_key, secret_digest
from gateway.dataplane.metrics import GatewayMetrics
from gateway.dataplane.router import Router, RouterSettings
from gateway.dataplane.routing import RouteSlo
from gateway.dataplane.upstream import Timeouts

ROUTER_APP = "tpgate"
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries it
POOL_APP_PREFIX = "pool-"
# Serve's own concurrency cap on the router replica: requests never wait in Serve's queue; the router's
# per-pool gates decide when to answer 429.
ROUTER_MAX_ONGOING_REQUESTS = 100_000
# An endpoint leaves routing when its replica has not re-asserted it for this many health checks (+ a margin).
LEASE_HEALTH_CHECKS = 3
LEASE_MARGIN_S = 5.0
DRAIN_MARGIN_S = 5.0  # beyond the request timeout: a drained pool is deleted at the latest by then
DEFAULT_ERROR_RATE_MAX = 0.01  # a promotion's error-rate limit when neither it nor the class sets one
# How often a stopping replica checks whether Serve still counts requests on it (Serve's default is 2 s, paid once
# by every replica that stops). Pool replicas never carry requests (they bypass Serve); the router's are waited for.
SHUTDOWN_WAIT_LOOP_S = 0.2
# In direct-ingress mode Serve keeps every stopping ingress replica (the router, and each pool: the one deployment
# of its application) reachable this long before it closes its listener, so that an external load balancer can
# deregister it: Serve's default is 30 s, on every stop, with nothing in flight. Pools take no requests through
# Serve at all; in front of the router there is only HAProxy, which retries a refused connection on another
# replica, and the requests in flight are still waited for. The replica reads the variable when it starts, so
# this holds in a cluster tpgate joins too.
NO_DRAINING_WINDOW = {"env_vars": {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}}
# Building a deployment registers a module with cloudpickle's process-wide "pickle by value" set and unregisters it
# after; two deploys in threads at once (the controller deploys in worker threads: a promotion's new pool while the
# reconcile loop repairs another) make the second unregister fail ("... is not registered for pickle by value"),
# failing that pool's deploy. Deploys in this process take turns.
_DEPLOYING = threading.Lock()


def pool_app_name(pool_id: str) -> str:
    return POOL_APP_PREFIX + pool_id


@dataclass(frozen=True)
class ServePoolDeployer:
    """Deploys each pool as its own Serve application (see :class:`gateway.control.controller.PoolDeployer`)."""

    startup_timeout_s: float
    stop_timeout_s: float
    health_check_period_s: float
    engine_host: str = LOOPBACK_ENGINE_HOST
    engine_key_seed: str | None = field(default=None, repr=False)  # engines beyond loopback: per-pool keys

    def deploy(self, pool: PoolSpec) -> None:
        """Deploy (or update) the pool's application; one deploy at a time in this process (see
        :data:`_DEPLOYING`)."""
        with _DEPLOYING:
            self._deploy(pool)

    def _deploy(self, pool: PoolSpec) -> None:
        deployment = serve.deployment(
            EnginePoolReplica,
            name="engine",
            num_replicas=pool.replicas,
            ray_actor_options={"num_gpus": pool.tp, "num_cpus": 0, "runtime_env": NO_DRAINING_WINDOW},
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=max(10.0, 2 * self.health_check_period_s),
            graceful_shutdown_timeout_s=self.stop_timeout_s + 5,
            graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
            max_ongoing_requests=16,
        )
        app = deployment.bind(  # type: ignore[attr-defined]
            pool.id,
            pool.engine,
            controller_name=CONTROLLER_NAME,
            namespace=NAMESPACE,
            startup_timeout_s=self.startup_timeout_s,
            stop_timeout_s=self.stop_timeout_s,
            host=self.engine_host,
            api_key=None if self.engine_key_seed is None else engine_key(self.engine_key_seed, pool.id),
        )
        serve._run(app, _blocking=False, name=pool_app_name(pool.id), route_prefix=None)

    def delete(self, pool_id: str) -> None:
        serve.delete(pool_app_name(pool_id), _blocking=True)

    def statuses(self) -> dict[str, tuple[str, str]]:
        result = {}
        for name, app in serve.status().applications.items():
            if name.startswith(POOL_APP_PREFIX):
                messages = [d.message for d in app.deployments.values() if d.message]
                message = "; ".join(messages or [app.message])
                result[name.removeprefix(POOL_APP_PREFIX)] = (str(app.status.value), message)
        return result


@serve.ingress()
class RouterDeployment:
    """The ingress replica: builds a :class:`Router` bound to the controller, with the admin API under
    ``/admin``."""

    def __init__(self, settings: RouterSettings, config: TpgateConfig) -> None:
        self._settings = settings
        self._config = config

    def __serve_build_asgi_app__(self) -> Router:
        from gateway.admin.surface import build_surface

        metrics = GatewayMetrics()
        admin = build_surface(self._config, admin_digest=self._settings.admin_token_digest or "", metrics=metrics)
        return Router(self._settings, ControlClient(name=CONTROLLER_NAME, namespace=NAMESPACE), metrics=metrics,
                      admin=admin)


def router_settings(
    config: TpgateConfig, *, api_key_classes: dict[str, str | None], admin_digest: str
) -> RouterSettings:
    r = config.router
    return RouterSettings(
        timeouts=Timeouts(connect_s=r.connect_timeout_s, first_byte_s=r.first_byte_timeout_s,
                          idle_s=r.stream_idle_timeout_s, total_s=r.request_timeout_s),
        max_inflight_per_replica=r.max_inflight_per_replica,
        queue_timeout_s=r.queue_timeout_s,
        max_attempts=r.max_attempts,
        max_body_bytes=r.max_body_bytes,
        body_read_timeout_s=r.body_read_timeout_s,
        max_json_depth=r.max_json_depth,
        retry_after_s=r.retry_after_s,
        api_key_classes=api_key_classes,
        admin_token_digest=admin_digest,
        front_stamps=config.server.fast_path == "haproxy",
        metrics_targets_dir=r.metrics_targets_dir,
        metrics_host=config.server.host,
    )


def controller_settings(config: TpgateConfig, capacity: Capacity) -> ControllerSettings:
    """The controller's settings from the configuration, with their fingerprint."""
    period_s = config.engine.health_check_period_s
    settings = ControllerSettings(
        model_name=config.model_name,
        classes=tuple(config.classes),
        default_class=config.default_class,
        capacity=capacity,
        slos={name: RouteSlo(ttft_s=c.slo.ttft_p99_s, tpot_s=c.slo.tpot_p99_s, e2e_s=c.slo.e2e_p99_s)
              for name, c in config.classes.items()},
        drain_deadline_s=config.router.request_timeout_s + DRAIN_MARGIN_S,
        lease_s=LEASE_HEALTH_CHECKS * period_s + LEASE_MARGIN_S,
        recovery_grace_s=LEASE_HEALTH_CHECKS * period_s + LEASE_MARGIN_S,
        store_path=str(Path(config.state_file).expanduser()),
        gateway_url=f"http://{config.server.host}:{config.server.port}",
        promotion_policies={name: promotion_policy(config, name) for name in config.classes},
        engine_key_seed=engine_key_seed(config),
    )
    # the seed is kept out of repr (logs); its digest still tells a controller made with another seed
    fingerprint = repr(settings) + secret_digest(settings.engine_key_seed or "")
    return replace(settings, digest=hashlib.sha256(fingerprint.encode()).hexdigest()[:16])


def promotion_policy(config: TpgateConfig, class_name: str) -> PromotionPolicy:
    """How ``class_name`` is promoted: the ``promotion:`` section with the class's SLOs."""
    p, slo = config.promotion, config.classes[class_name].slo
    error_rate_max = p.error_rate_max if p.error_rate_max is not None else slo.error_rate_max
    return PromotionPolicy(
        steps=tuple(p.steps), dwell_s=p.dwell_s, min_requests=p.min_requests, max_inconclusive_s=p.max_inconclusive_s,
        ready_timeout_s=p.ready_timeout_s, max_latency_ratio=p.max_latency_ratio,
        error_rate_max=DEFAULT_ERROR_RATE_MAX if error_rate_max is None else error_rate_max, max_5xx=p.max_5xx,
        check_period_s=p.check_period_s, ttft_p99_s=slo.ttft_p99_s, tpot_p99_s=slo.tpot_p99_s,
    )


def pool_deployer(config: TpgateConfig) -> ServePoolDeployer:
    return ServePoolDeployer(
        startup_timeout_s=config.engine.startup_timeout_s,
        stop_timeout_s=config.engine.stop_timeout_s,
        health_check_period_s=config.engine.health_check_period_s,
        engine_host=config.engine.host,
        engine_key_seed=engine_key_seed(config),
    )


def create_controller(settings: ControllerSettings, deployer: ServePoolDeployer) -> Any:
    """Create the controller actor: detached, restarted by Ray whenever it dies (it reloads its stored state),
    pinned to this node so its state file is on this node's disk."""
    actor_cls = ray.remote(Controller)
    node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=CONTROLLER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=1000,
        max_restarts=-1,
        scheduling_strategy=node,
    ).remote(settings, deployer)


def find_controller() -> Any | None:
    """The controller actor already in this cluster, if any."""
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def kill_controller(actor: Any) -> None:
    """Kill the controller for good (no restart)."""
    ray.kill(actor, no_restart=True)


def create_tuning_service(config: TpgateConfig) -> Any:
    """Create the tuning service actor, owned by this process (it stops with the ``tpgate serve`` that started
    it), on this node (its study storage sits next to the state file)."""
    actor_cls = ray.remote(TuningService)
    node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=TUNING_SERVICE_NAME, namespace=NAMESPACE, num_cpus=0, max_concurrency=100, scheduling_strategy=node,
    ).remote(config)


def find_tuning_service() -> Any | None:
    try:
        return ray.get_actor(TUNING_SERVICE_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def router_placement(config: TpgateConfig) -> dict[str, Any]:
    """Where router replicas run (``router.placement``): on this node (``gateway_node``: a label selector on Ray's
    node id), or anywhere."""
    if config.router.placement == "any_node":
        return {}
    return {"label_selector": {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}}


def deploy_router(config: TpgateConfig, settings: RouterSettings, *, environ: Mapping[str, str]) -> None:
    """The router's application; its replicas get Serve's request-path settings of
    :func:`gateway.cluster.serve_env.router_env_vars` (``environ`` overrides each)."""
    deployment = serve.deployment(
        RouterDeployment,
        name="router",
        num_replicas=config.router.replicas,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": router_env_vars(environ)},
                           **router_placement(config)},
        logging_config={"enable_access_log": config.router.serve_access_log},
        max_ongoing_requests=ROUTER_MAX_ONGOING_REQUESTS,
        graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
    )
    serve.run(deployment.bind(settings, config), name=ROUTER_APP, route_prefix="/")  # type: ignore[attr-defined]
