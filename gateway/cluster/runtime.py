"""The gateway's process-level lifecycle on Ray: start or join a cluster, deploy, and tear down only what
this process started.

On a machine without GPUs and with the simulated engine, Ray is started with a declared number of
simulated GPUs (``ray.init(num_gpus=N)`` works on a CPU host and assigns ids exactly as on real
hardware), so budget accounting, placement failures and traffic shifts behave as on a GPU cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.cluster import haproxy_guard, serve_env
from gateway.cluster.ports import check_ports_free
from gateway.cluster.ray_logs import driver_log_path, ray_logs_to
from gateway.config import LOOPBACK_ENGINE_HOST, TpgateConfig
from gateway.dataplane.auth import secret_digest
from gateway.errors import UserError


def resolve_api_keys(config: TpgateConfig, environ: Mapping[str, str]) -> dict[str, str | None]:
    """API key digest -> default class. Keys named by ``key_env`` must be set."""
    digests: dict[str, str | None] = {}
    for entry in config.auth.api_keys:
        if entry.key is not None:
            secret = entry.key.get_secret_value()
        else:
            assert entry.key_env is not None
            secret = environ.get(entry.key_env, "")
            if not secret:
                raise UserError(f"API key variable {entry.key_env} is not set")
        digests[secret_digest(secret)] = entry.default_class
    return digests


def ensure_admin_token(path_text: str) -> Path:
    """The admin token file, created with a random token and mode 0600 if missing; refused if others can
    read it."""
    return ensure_secret_file(path_text, what="the admin token file", secret=secrets.token_urlsafe(32))


def ensure_secret_file(path_text: str, *, what: str, secret: str) -> Path:
    """A private file holding a secret: created with ``secret`` (mode 0600, in a 0700 directory) if missing;
    refused if others can read it."""
    path = Path(path_text).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{path}: {what} must not be readable by others (chmod 600 {path})")
    return path


def engine_key_seed(config: TpgateConfig) -> str | None:
    """The seed of the per-pool engine keys (:func:`gateway.dataplane.auth.engine_key`), from
    ``auth.engine_key_file`` (created if missing) — only where engines listen beyond 127.0.0.1 (``engine.host``);
    None on one node, where engines listen on loopback and need no key."""
    if config.engine.host == LOOPBACK_ENGINE_HOST:
        return None
    path = ensure_secret_file(config.auth.engine_key_file, what="the engine key file", secret=secrets.token_hex(32))
    seed = path.read_text().strip()
    if not seed:
        raise UserError(f"{path}: the engine key file is empty")
    return seed


def ray_auth_environment(config: TpgateConfig) -> dict[str, str]:
    """Variables that turn on Ray's token authentication with tpgate's own private token (created if missing).
    Ray's processes inherit them; a client joining the cluster needs the same two."""
    path = ensure_secret_file(config.auth.ray_token_file, what="the Ray token file", secret=secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def read_admin_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise UserError(f"{path}: the admin token file is empty")
    return token


@dataclass(frozen=True)
class RayRuntime:
    """The Ray cluster a gateway runs on: whether this process started it, and where this process's Ray messages
    go (in the session's log directory, beside those of Ray's other processes and the engines)."""

    started: bool
    log_path: Path

    @property
    def logs_dir(self) -> Path:
        return self.log_path.parent


@contextlib.contextmanager
def ray_cluster(config: TpgateConfig) -> Iterator[RayRuntime]:
    """Start Ray (or join ``config.ray_address``). Starting one, the ports the gateway will listen on are checked
    first (:func:`gateway.cluster.ports.check_ports_free`); a cluster joined may already serve them itself."""
    started = config.ray_address is None
    if started:  # a cluster we join keeps its own authentication settings (the operator's environment)
        check_ports_free(config, os.environ)
        # before Ray is imported: it reads its authentication mode from the environment once
        os.environ.update(ray_auth_environment(config))
    import ray

    with contextlib.ExitStack() as cleanup:
        if config.server.fast_path == "haproxy":
            # Ray's processes inherit these; the guard keeps HAProxy on loopback (gateway/cluster/haproxy_guard.py)
            haproxy_dir, haproxy_env = haproxy_guard.prepare(
                front_host=config.server.host, front_port=config.server.port, environ=os.environ,
                front_rules=serve_env.front_rules(os.environ))
            cleanup.callback(shutil.rmtree, haproxy_dir, ignore_errors=True)
            os.environ.update(haproxy_env)
        kwargs: dict[str, Any] = {"namespace": "tpgate", "include_dashboard": False,
                                  "logging_level": logging.WARNING, "log_to_driver": False}
        if started:
            if config.engine.kind == "sim":
                kwargs["num_gpus"] = config.gpus  # simulated GPUs: Ray accounts for them as for real ones
            ray.init(**kwargs)
        else:
            ray.init(address=config.ray_address, **kwargs)
        with ray_logs_to(driver_log_path()) as log_path:
            try:
                yield RayRuntime(started=started, log_path=log_path)
            finally:
                if started:
                    ray.shutdown()
