"""Start (or join) a Ray cluster and serve the tpgate application in the foreground until interrupted."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from gateway.cluster.lifecycle import RunningGateway, capacity_of, heartbeat, running_gateway, sync_call
from gateway.cluster.runtime import resolve_api_keys
from gateway.config import TpgateConfig, load_config
from gateway.control.initial_state import initial_state
from gateway.control.state import StateError, validate_state
from gateway.errors import UserError

READY_POLL_S = 1.0
HEARTBEAT_PERIOD_S = 5.0


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

    try:
        with running_gateway(config, initial=state, reset_state=args.reset_state, api_key_classes=api_keys,
                             say=_say) as gateway:
            _print_banner(config, gateway, state_summary=sync_call(gateway.client.raw_status()))
            _follow_progress(gateway)
            while True:
                heartbeat(gateway.controller)
                time.sleep(HEARTBEAT_PERIOD_S)
    except KeyboardInterrupt:
        pass
    return 0


def _print_banner(config: TpgateConfig, gateway: RunningGateway, *, state_summary: dict[str, Any]) -> None:
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
        f"  metrics: {base}/metrics   admin token: {gateway.token_path} (status: {base}/admin/status)",
        f"  logs: {gateway.ray.logs_dir} (Ray, Serve's access log under serve/, engines; this process's Ray "
        f"messages: {gateway.ray.log_path.name})",
        f"  ray: {_ray_address()} (join with RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={config.auth.ray_token_file})",
        "  try:",
        f"    curl -s {base}/v1/chat/completions -H 'content-type: application/json' \\",
        f"      -d '{json.dumps(example)}'",
        f"  readiness: {base}/health answers 200 once every class has a ready replica",
        "  Ctrl-C stops the gateway and everything it started (in-flight requests finish; Ctrl-C again ends them).",
    ]
    print("\n".join(lines), flush=True)


def _ray_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def _say(line: str) -> None:
    print(f"tpgate: {line}", flush=True)


def _follow_progress(gateway: RunningGateway) -> None:
    """Print pool readiness as it changes until every pool is ready."""
    seen: dict[str, str] = {}
    while True:
        status = sync_call(gateway.client.raw_status())
        for pool_id, pool in status["pools"].items():
            line = f"{pool['ready_replicas']}/{pool['replicas']} replicas ready ({pool['phase']}) {pool['message']}"
            if seen.get(pool_id) != line:
                seen[pool_id] = line
                print(f"tpgate: pool {pool_id}: {line}".rstrip(), flush=True)
        if all(p["ready_replicas"] >= p["replicas"] for p in status["pools"].values()):
            print("tpgate: ready", flush=True)
            return
        heartbeat(gateway.controller)
        time.sleep(READY_POLL_S)


