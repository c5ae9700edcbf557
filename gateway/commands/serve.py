"""Start (or join) a Ray cluster and serve the tpgate application in the foreground until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from gateway.cluster.runtime import ensure_admin_token, ray_cluster, read_admin_token, resolve_api_keys
from gateway.config import TpgateConfig, load_config
from gateway.control.client import ControlClient, StateRejected
from gateway.control.initial_state import initial_state
from gateway.control.state import Capacity, StateError, validate_state
from gateway.control.store import StateStore, StoredState, StoreError
from gateway.dataplane.auth import secret_digest
from gateway.errors import UserError
from gateway.planner import find_gpu, load_model

READY_POLL_S = 1.0
TEARDOWN_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="tpgate YAML configuration (default: the embedded default)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting one")
    parser.add_argument("--reset-state", action="store_true",
                        help="forget the stored pools and routes and start from the configuration's")


def run(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        environ=os.environ,
        overrides={"server.host": args.host, "server.port": args.port, "ray_address": args.address},
        flag_names={"server.host": "--host", "server.port": "--port", "ray_address": "--address"},
    )
    capacity = capacity_of(config)
    try:
        state = initial_state(config, capacity)
        validate_state(state, capacity)
    except StateError as exc:
        raise UserError(str(exc)) from None
    api_keys = resolve_api_keys(config, os.environ)
    token_path = ensure_admin_token(config.auth.admin_token_file)
    admin_digest = secret_digest(read_admin_token(token_path))
    if args.reset_state:
        StateStore(config.state_file).reset()

    # after ray.init, which installs a SIGTERM handler of its own that aborts the process mid-teardown
    with ray_cluster(config) as started_ray, _stop_on_sigterm():
        from ray import serve

        from gateway.cluster import builders

        serve.start(http_options={"host": config.server.host, "port": config.server.port})
        client = ControlClient(name=builders.CONTROLLER_NAME, namespace=builders.NAMESPACE)
        controller = None
        try:
            controller = _controller_for(builders, builders.controller_settings(config, capacity),
                                         builders.pool_deployer(config))
            description = _sync(client.describe())
            if description["store_error"]:
                raise UserError(description["store_error"])
            if args.reset_state or not description["restored"]:
                _sync(client.apply(state))
            else:
                print(f"tpgate: restored {description['pools']} pools and {description['routes']} routes "
                      f"(state version {description['version']}) from {config.state_file}; the configuration's "
                      f"pools and routes seed only an empty store (--reset-state starts from them)", flush=True)
                _sync(controller.reconcile.remote(now=True))
            builders.deploy_router(config, builders.router_settings(config, api_key_classes=api_keys,
                                                                    admin_digest=admin_digest))
            _print_banner(config, token_path, state_summary=_sync(client.raw_status()))
            _follow_progress(client, controller)
            while True:
                _heartbeat(controller)
                time.sleep(HEARTBEAT_PERIOD_S)
        except KeyboardInterrupt:
            print("\ntpgate: stopping", flush=True)
        finally:
            _teardown(client, controller, config, started_ray=started_ray)
    return 0


OWNER = f"pid {os.getpid()} on {socket.gethostname()}"
HEARTBEAT_PERIOD_S = 5.0
OWNER_SILENT_AFTER_S = 30.0  # a controller whose tpgate serve was silent this long is stale


def _controller_for(builders: Any, settings: Any, deployer: Any) -> Any:
    """The controller for this gateway: the one in the cluster when it has the same settings and its
    ``tpgate serve`` is gone, or a new one (a stale controller with other settings is replaced, saying so)."""
    import ray

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
            print(f"tpgate: reusing the controller of an earlier tpgate serve (epoch {info['epoch']}, "
                  f"state version {info['version']})", flush=True)
            _heartbeat(existing)
            return existing
        print("tpgate: replacing a stale controller left by an earlier tpgate serve with other settings",
              flush=True)
        builders.kill_controller(existing)
        deadline = time.monotonic() + 30
        while builders.find_controller() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    controller = builders.create_controller(settings, deployer)
    _heartbeat(controller)
    return controller


def _heartbeat(controller: Any) -> None:
    import ray

    with contextlib.suppress(Exception):  # the controller restarting: the next beat tells it again
        ray.get(controller.heartbeat.remote(OWNER), timeout=5)


def _sync(awaitable: Any) -> Any:
    """Run one control-client call (or await a Ray object ref) from this synchronous command."""
    async def call() -> Any:
        return await awaitable

    try:
        return asyncio.run(call())
    except StateRejected as exc:
        raise UserError(str(exc)) from None


def capacity_of(config: TpgateConfig) -> Capacity:
    return Capacity(
        model=load_model(config.model),
        gpu=find_gpu(config.gpu, config.catalog()),
        gpus=config.gpus,
        gpus_per_node=config.node_size,
    )


def _print_banner(config: TpgateConfig, token_path: Any, *, state_summary: dict[str, Any]) -> None:
    base = f"http://{config.server.host}:{config.server.port}"
    example = {"model": config.model_name, "messages": [{"role": "user", "content": "hi"}]}
    lines = [
        f"tpgate: serving {config.model_name} on {base}/v1 ({config.engine.kind} engines, "
        f"{config.gpus} x {config.gpu})",
    ]
    for pool_id, pool in state_summary["pools"].items():
        lines.append(f"  pool {pool_id}: {pool['replicas']} x tp{pool['tp']}")
    for route, weights in state_summary["routes"].items():
        lines.append(f"  class {route}: " + ", ".join(f"{p} {w:.0%}" for p, w in weights.items()))
    lines += [
        f"  metrics: {base}/metrics   admin token: {token_path} (status: {base}/admin/status)",
        "  try:",
        f"    curl -s {base}/v1/chat/completions -H 'content-type: application/json' \\",
        f"      -d '{json.dumps(example)}'",
        "  Ctrl-C stops the gateway and everything it started.",
    ]
    print("\n".join(lines), flush=True)


def _follow_progress(client: ControlClient, controller: Any) -> None:
    """Print pool readiness as it changes until every pool is ready."""
    seen: dict[str, str] = {}
    while True:
        status = _sync(client.raw_status())
        for pool_id, pool in status["pools"].items():
            line = f"{pool['ready_replicas']}/{pool['replicas']} replicas ready ({pool['phase']}) {pool['message']}"
            if seen.get(pool_id) != line:
                seen[pool_id] = line
                print(f"tpgate: pool {pool_id}: {line}".rstrip(), flush=True)
        if all(p["ready_replicas"] >= p["replicas"] for p in status["pools"].values()):
            print("tpgate: ready", flush=True)
            return
        _heartbeat(controller)
        time.sleep(READY_POLL_S)


def _teardown(client: ControlClient, controller: Any, config: TpgateConfig, *, started_ray: bool) -> None:
    """Delete the router and the pools this gateway deployed (all at once; each pool stops its engines), then
    the controller. Other Serve applications in the cluster are left alone."""
    from ray import serve

    from gateway.cluster.builders import ROUTER_APP, kill_controller, pool_app_name

    try:
        pool_ids = _sync(client.owned_applications())
    except Exception:  # no controller: what the store says this gateway runs
        stored = _stored_state(config)
        pool_ids = list(stored.state.pools) if stored is not None else []
    ours = {ROUTER_APP, *map(pool_app_name, pool_ids)}

    def running() -> list[str]:
        return [name for name in serve.status().applications if name in ours]

    with contextlib.suppress(Exception):
        for name in running():
            serve.delete(name, _blocking=False)
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
        while running() and time.monotonic() < deadline:
            time.sleep(0.2)
    if controller is not None:
        with contextlib.suppress(Exception):
            kill_controller(controller)
    if started_ray:
        with contextlib.suppress(Exception):
            serve.shutdown()


def _stored_state(config: TpgateConfig) -> StoredState | None:
    try:
        return StateStore(config.state_file).load()
    except StoreError:
        return None


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()
