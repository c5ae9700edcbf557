"""Checking, before Ray starts, that the ports a gateway must listen on are free.

Without the check a second ``tpgate serve`` on a port in use fails about 15 s later deep inside Serve or HAProxy,
with a long traceback. The check binds each port the way a server would (``SO_REUSEADDR``: a port held only by
connections closing in TIME_WAIT counts as free) and lets go at once.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.cluster.haproxy_guard import LOOPBACK_V4, PORT_VARIABLES
from gateway.config import TpgateConfig
from gateway.errors import UserError

IN_USE = "already in use"


@dataclass(frozen=True)
class WantedPort:
    host: str
    port: int
    source: str  # where the port was set, for the message


def wanted_ports(config: TpgateConfig, environ: Mapping[str, str]) -> list[WantedPort]:
    """The gateway's front port, and in HAProxy mode the stats, metrics and fallback-proxy ports the operator set
    (tpgate picks free ones for those that are not set)."""
    wanted = [WantedPort(config.server.host, config.server.port, "server.port, --port")]
    if config.server.fast_path == "haproxy":
        for name in PORT_VARIABLES:
            text = environ.get(name)
            if not text:
                continue
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise UserError(f"{name}={text!r} is not a port number")
            wanted.append(WantedPort(LOOPBACK_V4, int(text), name))  # the guard keeps these on loopback
    return wanted


def port_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` now, or None when it could."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return f"unknown host ({exc.strerror})"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return IN_USE
            return exc.strerror or str(exc)
    return None


def check_ports_free(config: TpgateConfig, environ: Mapping[str, str]) -> None:
    """Raise :class:`UserError` (one line, naming the port and where it was set) if a wanted port is taken."""
    for wanted in wanted_ports(config, environ):
        problem = port_problem(wanted.host, wanted.port)
        if problem == IN_USE:
            raise UserError(f"port {wanted.port} on {wanted.host} ({wanted.source}) is already in use: another "
                            f"tpgate serve or another server listens there; stop it or choose another port")
        if problem is not None:
            raise UserError(f"cannot listen on {wanted.host}:{wanted.port} ({wanted.source}): {problem}")
