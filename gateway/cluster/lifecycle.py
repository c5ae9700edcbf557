"""A gateway's life on Ray, for the commands that run one (``tpgate serve``, and ``tpgate tune`` with a gateway
of its own): start or join Ray, bring up the controller and the router, and take down exactly what was started.

The controller is found or created (:func:`controller_for`): one left in the cluster by an earlier
``tpgate serve`` is reused when it has the same settings and its owner is gone, replaced (saying so) when its
settings differ, and refused while its owner still runs. Its stored state is restored unless ``reset_state``;
otherwise it is seeded with ``initial``.

Stopping (:mod:`gateway.cluster.stopping`): SIGINT and SIGTERM both raise KeyboardInterrupt in the main thread
while the gateway runs, whatever the process inherited (a shell starts background jobs with SIGINT ignored). The
routers then refuse new requests and the gateway waits, saying how many are left, for those in flight (at most
``router.request_timeout_s``); a second signal ends them. Then the controller goes first (so that its reconcile
loop cannot deploy again a pool being deleted), and the router and the pools this gateway deployed are deleted
together (each pool stops its engines); other Serve applications are left alone. Ray, when this process started
it, stops last, taking Serve's own actors with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.cluster.runtime import RayRuntime, ensure_admin_token, ray_cluster, read_admin_token
from gateway.cluster.stopping import StopSignals, drain, plural
from gateway.config import TpgateConfig
from gateway.control.client import ControlClient, StateRejected
from gateway.control.state import Capacity, DesiredState
from gateway.control.store import StateStore, StoredState, StoreError
from gateway.dataplane.auth import secret_digest
from gateway.errors import UserError
from gateway.planner import find_gpu, load_model

OWNER = f"pid {os.getpid()} on {socket.gethostname()}"
OWNER_SILENT_AFTER_S = 30.0  # a controller whose tpgate serve was silent this long is stale
TEARDOWN_TIMEOUT_S = 60.0
TUNING_STOP_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class RunningGateway:
    """A gateway this process runs: its control client, the controller actor, and the admin token."""

    client: ControlClient
    controller: Any
    token_path: Path
    admin_token: str
    url: str
    ray: RayRuntime


def capacity_of(config: TpgateConfig) -> Capacity:
    return Capacity(model=load_model(config.model), gpu=find_gpu(config.gpu, config.catalog()), gpus=config.gpus,
                    gpus_per_node=config.node_size)


@contextlib.contextmanager
def running_gateway(
    config: TpgateConfig,
    *,
    initial: DesiredState,
    reset_state: bool,
    api_key_classes: Mapping[str, str | None],
    say: Callable[[str], None],
    tuning_service: bool = True,
) -> Iterator[RunningGateway]:
    """Run the gateway for the duration of the block (see the module's docstring); ``tuning_service``: with the
    service online studies run in (the admin API's ``/admin/tuning``)."""
    token_path = ensure_admin_token(config.auth.admin_token_file)
    admin_token = read_admin_token(token_path)
    if reset_state:
        StateStore(config.state_file).reset()
    capacity = capacity_of(config)
    signals = StopSignals()
    try:
        # signals after ray.init, which installs a SIGTERM handler of its own that aborts the process mid-teardown
        with ray_cluster(config) as runtime, signals:
            from ray import serve

            from gateway.cluster import builders

            serve.start(proxy_location=config.server.proxy_location,
                        http_options={"host": config.server.host, "port": config.server.port})
            client = ControlClient(name=builders.CONTROLLER_NAME, namespace=builders.NAMESPACE)
            controller = tuning = None
            try:
                settings = builders.controller_settings(config, capacity)
                controller = controller_for(settings, builders.pool_deployer(config), say=say)
                sync_call(client.set_stop_phase(""))  # a reused controller may have been told to stop
                description = sync_call(client.describe())
                if description["store_error"]:
                    raise UserError(description["store_error"])
                if reset_state or not description["restored"]:
                    sync_call(client.apply(initial))
                else:
                    say(f"restored {description['pools']} pools and {description['routes']} routes (state version "
                        f"{description['version']}) from {config.state_file}; the configuration's pools and routes "
                        f"seed only an empty store (--reset-state starts from them)")
                    sync_call(controller.reconcile.remote(now=True))
                if tuning_service:
                    tuning = builders.create_tuning_service(config)
                builders.deploy_router(config, builders.router_settings(
                    config, api_key_classes=dict(api_key_classes), admin_digest=secret_digest(admin_token)),
                    environ=os.environ)
                yield RunningGateway(client, controller, token_path, admin_token,
                                     f"http://{config.server.host}:{config.server.port}", runtime)
            except KeyboardInterrupt:
                say("stopping")
                if controller is not None:
                    drain(client, signals, limit_s=config.router.request_timeout_s, call=sync_call,
                          say=lambda line: say(f"stopping: {line}"))
                raise
            finally:
                stop_tuning_service(tuning)
                if controller is not None:  # without one, nothing here is this gateway's to remove
                    with signals.answered(say, "still stopping: removing what this gateway deployed"):
                        teardown(client, controller, config, say=say)
    finally:
        if signals.first_at is not None:
            say(f"stopped in {time.monotonic() - signals.first_at:.1f} s")


def controller_for(settings: Any, deployer: Any, *, say: Callable[[str], None]) -> Any:
    """The controller for this gateway: the one in the cluster when it has the same settings and its
    ``tpgate serve`` is gone, or a new one (a stale controller with other settings is replaced, saying so)."""
    import ray

    from gateway.cluster import builders

    existing = builders.find_controller()
    if existing is not None:
        try:
            info = ray.get(existing.describe.remote(), timeout=10)
        except Exception:  # dead or unreachable: replaced below
            info = None
        if info is not None and info["owner_silent_s"] is not None and info["owner_silent_s"] < OWNER_SILENT_AFTER_S:
            raise UserError(f"another tpgate serve ({info['owner']}) runs the gateway of this Ray cluster; "
                            f"stop it first")
        if info is not None and info["digest"] == settings.digest:
            say(f"reusing the controller of an earlier tpgate serve (epoch {info['epoch']}, "
                f"state version {info['version']})")
            heartbeat(existing)
            return existing
        say("replacing a stale controller left by an earlier tpgate serve with other settings")
        builders.kill_controller(existing)
        deadline = time.monotonic() + 30
        while builders.find_controller() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    controller = builders.create_controller(settings, deployer)
    heartbeat(controller)
    return controller


def heartbeat(controller: Any) -> None:
    """Tell the controller this process still runs its gateway."""
    import ray

    with contextlib.suppress(Exception):  # the controller restarting: the next beat tells it again
        ray.get(controller.heartbeat.remote(OWNER), timeout=5)


def sync_call(awaitable: Awaitable[Any]) -> Any:
    """Run one control-client call (or await a Ray object ref) from synchronous code."""
    async def call() -> Any:
        return await awaitable

    try:
        return asyncio.run(call())
    except StateRejected as exc:
        raise UserError(str(exc)) from None


def stop_tuning_service(actor: Any) -> None:
    """Stop the studies in flight (each removes its trial pool and stops its load) and the service."""
    if actor is None:
        return
    import ray

    with contextlib.suppress(Exception):  # already gone: nothing of it to stop
        ray.get(actor.shutdown.remote(), timeout=TUNING_STOP_TIMEOUT_S)
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


def teardown(client: ControlClient, controller: Any, config: TpgateConfig, *, say: Callable[[str], None]) -> None:
    """Kill the controller, then delete the router and the pools this gateway deployed (all at once; each pool
    stops its engines). The controller goes first so that its reconcile loop cannot deploy a pool again while it
    is deleted. Other Serve applications in the cluster are left alone; Serve itself stops with Ray."""
    from ray import serve

    from gateway.cluster.builders import ROUTER_APP, kill_controller, pool_app_name

    try:
        pool_ids = sync_call(client.owned_applications())
    except Exception:  # no controller: what the store says this gateway runs
        stored = _stored_state(config)
        pool_ids = list(stored.state.pools) if stored is not None else []
    with contextlib.suppress(Exception):
        kill_controller(controller)
    ours = {ROUTER_APP, *map(pool_app_name, pool_ids)}

    def running() -> list[str]:
        return [name for name in serve.status().applications if name in ours]

    with contextlib.suppress(Exception):
        names = running()
        if names:
            pools = [name for name in names if name != ROUTER_APP]
            say(f"stopping: removing {plural(len(pools), 'pool')}" + (" and the router" if ROUTER_APP in names else ""))
        for name in names:
            serve.delete(name, _blocking=False)
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
        while running() and time.monotonic() < deadline:
            time.sleep(0.2)


def _stored_state(config: TpgateConfig) -> StoredState | None:
    try:
        return StateStore(config.state_file).load()
    except StoreError:
        return None

