"""Process helpers shared by the engine supervisor and the HAProxy guard (standard library only)."""

from __future__ import annotations

import ctypes
import signal
import socket

PR_SET_PDEATHSIG = 1
LOOPBACK_V4 = "127.0.0.1"


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent *thread* exits (Linux ``PR_SET_PDEATHSIG``); run in the
    child between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (whoever needs it binds it a moment later)."""
    return free_port(LOOPBACK_V4)


def free_port(host: str) -> int:
    """A TCP port free on ``host`` (an IPv4 address of this machine) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
