"""A Prometheus server for one study: Debian's ``prometheus`` binary on loopback, scraping the gateway and the
trial pools' engines every second, stopped when the study ends.

Targets come from file-based service discovery: the tuner rewrites two JSON files (gateway, engines) as pools
come and go, and Prometheus picks the change up at once (it watches the files). :meth:`PrometheusServer.watch`
returns when every target answered a scrape. The server's data lives in a temporary directory, removed at the
end; it dies with the process that started it (``PR_SET_PDEATHSIG``), so a killed tuner leaves no Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp
import yaml

from gateway.cluster.procutil import LOOPBACK_V4, die_with_parent, free_loopback_port
from tuner.sources import MetricsUnavailable, PrometheusSource, WindowMark
from tuner.window import WindowValues

SCRAPE_INTERVAL_S = 1.0
STARTUP_TIMEOUT_S = 30.0
TARGETS_UP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.25
LOG_TAIL_CHARS = 2000
GATEWAY_JOB = "tpgate-gateway"
ENGINES_JOB = "tpgate-engines"


class PrometheusServerError(RuntimeError):
    """The server could not start or its targets never came up; the message carries the log's tail."""


def server_config(workdir: Path, *, scrape_interval_s: float = SCRAPE_INTERVAL_S) -> dict[str, object]:
    """The server's configuration: one job for the gateway, one for engines, both from target files."""
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"

    def job(name: str, file: str) -> dict[str, object]:
        return {"job_name": name, "file_sd_configs": [{"files": [str(workdir / file)]}]}

    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [job(GATEWAY_JOB, "gateway.json"), job(ENGINES_JOB, "engines.json")],
    }


def target_groups(urls: Mapping[str, Mapping[str, str]]) -> list[dict[str, object]]:
    """File-SD target groups, one per (group, member): ``host:port`` labelled ``tpgate_group`` and
    ``tpgate_member`` (pool and replica for engines). Not ``pool``: a target label of the same name as a
    scraped one would rename the gateway's own ``pool`` label to ``exported_pool``."""
    return [
        {"targets": [_host_port(url)], "labels": {"tpgate_group": group, "tpgate_member": member}}
        for group, members in sorted(urls.items())
        for member, url in sorted(members.items())
    ]


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ValueError(f"{url!r} is not an http://host:port URL")
    return f"{parts.hostname}:{parts.port}"


class PrometheusServer:
    """One ``prometheus`` process on ``127.0.0.1:<free port>``; an async context manager."""

    def __init__(self, *, binary: str = "prometheus", scrape_interval_s: float = SCRAPE_INTERVAL_S) -> None:
        self.binary = binary
        self.scrape_interval_s = scrape_interval_s
        self.url = ""
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PrometheusServer:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the server and return once it answers ``/-/ready``; PrometheusServerError otherwise."""
        path = shutil.which(self.binary)
        if path is None:
            raise PrometheusServerError(f"no {self.binary!r} on PATH (Debian: apt-get install -y prometheus)")
        self._workdir = Path(tempfile.mkdtemp(prefix="tpgate-prometheus-"))
        for name in ("gateway.json", "engines.json"):
            _write_atomically(self._workdir / name, "[]")
        config = self._workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(server_config(self._workdir, scrape_interval_s=self.scrape_interval_s)))
        port = free_loopback_port()
        self.url = f"http://{LOOPBACK_V4}:{port}"
        with (self._workdir / "prometheus.log").open("wb") as log:
            self._process = subprocess.Popen(
                [path, f"--config.file={config}", f"--web.listen-address={LOOPBACK_V4}:{port}",
                 f"--storage.tsdb.path={self._workdir / 'data'}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            )
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PrometheusServerError(f"prometheus exited with status {self._process.returncode}:\n"
                                            + self.log_tail())
            if await self._ready():
                return
            await asyncio.sleep(POLL_S)
        await self.stop()
        raise PrometheusServerError(f"prometheus not ready after {STARTUP_TIMEOUT_S:g} s:\n{self.log_tail()}")

    async def watch(self, gateway: Mapping[str, str], engines: Mapping[str, Mapping[str, str]], *,
                    timeout_s: float = TARGETS_UP_TIMEOUT_S) -> None:
        """Scrape these targets from now on (``gateway``: router id -> base URL; ``engines``: pool -> replica
        -> base URL) and return once each has been scraped successfully."""
        if self._workdir is None:
            raise PrometheusServerError("the server is not running")
        _write_atomically(self._workdir / "gateway.json", json.dumps(target_groups({"gateway": gateway})))
        _write_atomically(self._workdir / "engines.json", json.dumps(target_groups(engines)))
        wanted = {(GATEWAY_JOB, _host_port(u)) for u in gateway.values()}
        wanted |= {(ENGINES_JOB, _host_port(u)) for replicas in engines.values() for u in replicas.values()}
        deadline = time.monotonic() + timeout_s
        up: set[tuple[str, str]] = set()
        while time.monotonic() < deadline:
            up = await self._targets_up()
            if wanted <= up:
                return
            await asyncio.sleep(POLL_S)
        missing = ", ".join(f"{job} {target}" for job, target in sorted(wanted - up))
        raise PrometheusServerError(f"targets not up after {timeout_s:g} s: {missing}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; remove the data directory."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self) -> str:
        if self._workdir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._workdir / "prometheus.log").read_text(errors="replace")[-LOG_TAIL_CHARS:]
        return ""

    async def _ready(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/-/ready") as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _targets_up(self) -> set[tuple[str, str]]:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/api/v1/targets", params={"state": "active"}) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return set()
        return {
            (target["labels"].get("job", ""), target["labels"].get("instance", ""))
            for target in body.get("data", {}).get("activeTargets", [])
            if target.get("health") == "up"
        }


class ManagedPrometheusSource:
    """A :class:`PrometheusSource` over a :class:`PrometheusServer` this source started and keeps pointed at
    the gateway and the current trial pool's engines."""

    name = "prometheus"

    def __init__(self, server: PrometheusServer, *, router_metrics_urls: tuple[str, ...] = ()) -> None:
        self._server = server
        self._router_urls = router_metrics_urls
        self._source = PrometheusSource(server.url)

    @property
    def description(self) -> str:
        return f"Prometheus started by the tuner at {self._server.url} (1 s scrapes of the gateway and engines)"

    async def watch(self, gateway_url: str, engines: Mapping[str, Mapping[str, str]]) -> None:
        routers = {f"router-{i}": url.removesuffix("/metrics") for i, url in enumerate(self._router_urls)}
        try:
            await self._server.watch(routers or {"router-0": gateway_url}, engines)
        except PrometheusServerError as exc:
            raise MetricsUnavailable(str(exc)) from None

    async def mark(self) -> WindowMark:
        return await self._source.mark()

    async def window_values(self, start: WindowMark, end: WindowMark, *, route: str, pool: str) -> WindowValues:
        return await self._source.window_values(start, end, route=route, pool=pool)

    async def aclose(self) -> None:
        await self._source.aclose()


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, so Prometheus never reads half a file."""
    scratch = path.with_suffix(path.suffix + ".tmp")
    scratch.write_text(text)
    os.replace(scratch, path)
