"""Start (or join) a Ray cluster and serve the tpgate application in the foreground until interrupted."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from gateway.cluster.runtime import ensure_admin_token, ray_cluster, read_admin_token, resolve_api_keys
from gateway.config import TpgateConfig, load_config
from gateway.control.initial_state import initial_state
from gateway.control.state import Capacity, StateError, validate_state
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

    # after ray.init, which installs a SIGTERM handler of its own that aborts the process mid-teardown
    with ray_cluster(config) as started_ray, _stop_on_sigterm():
        from ray import serve

        from gateway.cluster import builders as app

        serve.start(http_options={"host": config.server.host, "port": config.server.port})
        controller = app.start_controller(config, capacity)
        try:
            _call(controller.apply.remote(state))
            app.deploy_router(config, app.router_settings(config, api_key_classes=api_keys, admin_digest=admin_digest))
            _print_banner(config, token_path, state_summary=_call(controller.status.remote()))
            _follow_progress(controller)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\ntpgate: stopping", flush=True)
        finally:
            _teardown(controller, started_ray=started_ray)
    return 0


def capacity_of(config: TpgateConfig) -> Capacity:
    return Capacity(
        model=load_model(config.model),
        gpu=find_gpu(config.gpu, config.catalog()),
        gpus=config.gpus,
        gpus_per_node=config.node_size,
    )


def _call(ref: Any) -> Any:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        if isinstance(cause, StateError):
            raise UserError(str(cause)) from None
        raise


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


def _follow_progress(controller: Any) -> None:
    """Print pool readiness as it changes until every pool is ready."""
    seen: dict[str, str] = {}
    while True:
        status = _call(controller.status.remote())
        for pool_id, pool in status["pools"].items():
            line = f"{pool['ready_replicas']}/{pool['replicas']} replicas ready ({pool['phase']}) {pool['message']}"
            if seen.get(pool_id) != line:
                seen[pool_id] = line
                print(f"tpgate: pool {pool_id}: {line}".rstrip(), flush=True)
        if all(p["ready_replicas"] == p["replicas"] for p in status["pools"].values()):
            print("tpgate: ready", flush=True)
            return
        time.sleep(READY_POLL_S)


def _teardown(controller: Any, *, started_ray: bool) -> None:
    """Delete the router and every pool (all at once; each pool stops its engines), then the controller."""
    import ray
    from ray import serve

    from gateway.cluster.builders import POOL_APP_PREFIX, ROUTER_APP

    def ours() -> list[str]:
        return [n for n in serve.status().applications if n == ROUTER_APP or n.startswith(POOL_APP_PREFIX)]

    with contextlib.suppress(Exception):
        for name in ours():
            serve.delete(name, _blocking=False)
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
    with contextlib.suppress(Exception):
        ray.kill(controller)
    if started_ray:
        with contextlib.suppress(Exception):
            serve.shutdown()


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
