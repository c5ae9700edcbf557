"""Every router replica its own Prometheus target, so the gateway's metrics stay whole with several replicas.

Requests and scrapes through the front door land on one replica at a time, so with ``router.replicas > 1`` a
scrape of the gateway's ``/metrics`` sees only that replica's counters. With ``router.metrics_targets_dir`` set,
each replica serves its ``/metrics`` on a free port of its own (on the gateway's host) and writes a file-based
service discovery (file_sd) target file ``tpgate-router-<id>.json`` into that directory; it removes the file
when it stops. A Prometheus that reads ``<dir>/tpgate-router-*.json`` scrapes every replica, and sums over them
(``sum(rate(...))``, ``histogram_quantile(0.99, sum by (le) (rate(..._bucket[1m])))``) are the gateway's.

A replica that dies without stopping leaves its file; Prometheus then shows that target down (``up == 0``) and
its series stop, which leaves sums over the live replicas right. The directory must be on the node that runs
Prometheus (one node, or a shared file system).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

TARGET_FILE_PREFIX = "tpgate-router-"
TARGET_FILE_GLOB = TARGET_FILE_PREFIX + "*.json"
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def target_groups(host: str, port: int, router_id: str) -> list[dict[str, Any]]:
    """The file_sd content for one replica: its ``host:port``, labelled ``tpgate_router`` with its id."""
    return [{"targets": [f"{host}:{port}"], "labels": {"tpgate_router": router_id}}]


def target_file(directory: Path, router_id: str) -> Path:
    return directory / f"{TARGET_FILE_PREFIX}{router_id}.json"


def read_targets(directory: Path) -> list[str]:
    """Every ``host:port`` listed in the directory's replica target files (for a client that scrapes them
    itself), sorted; files being replaced or not JSON are skipped."""
    found = []
    for path in sorted(directory.glob(TARGET_FILE_GLOB)):
        try:
            groups = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found += [str(target) for group in groups for target in group.get("targets", [])]
    return sorted(found)


class MetricsTarget:
    """One replica's own ``/metrics`` listener and its target file; :meth:`start` in the app's lifespan
    startup, :meth:`stop` at its shutdown."""

    def __init__(self, directory: str, *, host: str, router_id: str, exposition: Callable[[], bytes]) -> None:
        self._directory = Path(directory).expanduser()
        self._host = host
        self._router_id = router_id
        self._exposition = exposition
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def path(self) -> Path:
        return target_file(self._directory, self._router_id)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self._host, 0))  # a free port, chosen by the kernel
        self.port = int(sock.getsockname()[1])
        await web.SockSite(runner, sock).start()
        self._runner = runner
        self._directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, json.dumps(target_groups(self._host, self.port, self._router_id)))

    async def stop(self) -> None:
        self.path.unlink(missing_ok=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._exposition(), headers={"content-type": EXPOSITION_CONTENT_TYPE})


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, so Prometheus never reads half a file."""
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(scratch, 0o644)
    os.replace(scratch, path)
