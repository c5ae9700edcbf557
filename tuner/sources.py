"""Where a trial's window values come from: a Prometheus server's HTTP API, or direct scrapes of the gateway.

Both implement :class:`MetricSource` and return the same :data:`tuner.window.WindowValues`; the trial record
says which one measured it (``source``). A source marks the window's start and end (:meth:`MetricSource.mark`)
and then computes the values between two marks. Engines' simulated clocks are read here too
(:class:`SimClockReader`): ``GET /sim/stats`` on each engine replica.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from tuner.promql import Window, latest_sample_query, window_queries
from tuner.scrape import Samples, parse_exposition
from tuner.scrape import window_values as scrape_window_values
from tuner.timescale import ClockReading
from tuner.window import WindowValues

HTTP_TIMEOUT_S = 10.0
INGEST_WAIT_S = 15.0  # how long to wait for Prometheus to scrape past a window's end
INGEST_POLL_S = 0.25


class _Http:
    """One aiohttp session per reader, opened on first use (inside the event loop) and closed by its owner."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class MetricsUnavailable(RuntimeError):
    """The metrics could not be read (server down, scrape failed, query error); the message says which."""


@dataclass(frozen=True)
class WindowMark:
    """A window edge: Unix time, and the routers' scrapes taken then (direct scrape only)."""

    at_s: float
    scrapes: tuple[Samples, ...] = ()


class MetricSource(Protocol):
    """Reads a trial window's gateway metrics. ``name`` is "prometheus" or "scrape"; ``description`` says where
    from, for the output. Implementations own their HTTP session; :meth:`aclose` releases it."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    async def watch(self, gateway_url: str, engines: Mapping[str, Mapping[str, str]]) -> None:
        """What to measure from now on: the gateway, and the engine endpoints of each pool (pool -> replica ->
        base URL). Returns once the source can measure them."""
        ...

    async def mark(self) -> WindowMark: ...

    async def window_values(self, start: WindowMark, end: WindowMark, *, route: str, pool: str) -> WindowValues:
        ...

    async def aclose(self) -> None: ...


class ScrapeSource:
    """Direct scrapes of each router replica's ``/metrics`` at the window's edges (no Prometheus needed)."""

    name = "scrape"

    def __init__(self, urls: Sequence[str] = (), *, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        """``urls``: each router replica's metrics URL; empty: the gateway's ``/metrics`` (one router)."""
        self._urls = tuple(urls)
        self._http = _Http(timeout_s)

    @property
    def description(self) -> str:
        return "direct scrapes of " + (", ".join(self._urls) or "the gateway's /metrics") + " (no Prometheus)"

    async def watch(self, gateway_url: str, engines: Mapping[str, Mapping[str, str]]) -> None:
        if not self._urls:
            self._urls = (gateway_url.rstrip("/") + "/metrics",)

    async def mark(self) -> WindowMark:
        if not self._urls:
            raise MetricsUnavailable("no metrics URL to scrape yet (watch() names the gateway)")
        at_s = time.time()
        texts = await asyncio.gather(*(self._scrape(url) for url in self._urls))
        return WindowMark(at_s=at_s, scrapes=tuple(parse_exposition(text) for text in texts))

    async def window_values(self, start: WindowMark, end: WindowMark, *, route: str, pool: str) -> WindowValues:
        return scrape_window_values(start.scrapes, end.scrapes, route=route, pool=pool)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _scrape(self, url: str) -> str:
        try:
            async with self._http.session().get(url) as response:
                if response.status != 200:
                    raise MetricsUnavailable(f"scrape of {url}: HTTP {response.status}")
                return await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MetricsUnavailable(f"scrape of {url} failed: {exc!r}") from None


class PrometheusSource:
    """PromQL over a Prometheus server's HTTP API (``/api/v1/query``), evaluated at the window's end."""

    name = "prometheus"

    def __init__(self, url: str, *, timeout_s: float = HTTP_TIMEOUT_S, ingest_wait_s: float = INGEST_WAIT_S) -> None:
        self.url = url.rstrip("/")
        self._ingest_wait_s = ingest_wait_s
        self._http = _Http(timeout_s)

    @property
    def description(self) -> str:
        return f"Prometheus at {self.url}"

    async def watch(self, gateway_url: str, engines: Mapping[str, Mapping[str, str]]) -> None:
        """A Prometheus server run by someone else already scrapes what it scrapes."""

    async def mark(self) -> WindowMark:
        return WindowMark(at_s=time.time())

    async def window_values(self, start: WindowMark, end: WindowMark, *, route: str, pool: str) -> WindowValues:
        window = Window(start.at_s, end.at_s)
        await self._wait_ingested(route, window.end_s)
        queries = window_queries(route, pool, window)
        results = await asyncio.gather(*(self.query(expr, at_s=window.end_s) for expr in queries.values()))
        return {name: scalar(result) for name, result in zip(queries, results, strict=True)}

    async def query(self, expr: str, *, at_s: float | None = None) -> list[dict[str, Any]]:
        """The result vector of an instant query (at ``at_s``, Unix seconds; now when None)."""
        params = {"query": expr} if at_s is None else {"query": expr, "time": f"{at_s:.3f}"}
        try:
            async with self._http.session().get(f"{self.url}/api/v1/query", params=params) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MetricsUnavailable(f"Prometheus at {self.url}: {exc!r}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise MetricsUnavailable(f"Prometheus at {self.url} refused {expr!r}: {error}")
        result = body["data"]["result"]
        return result if isinstance(result, list) else []

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _wait_ingested(self, route: str, end_s: float) -> None:
        """Until Prometheus holds a sample of the route taken after the window's end (or the wait runs out:
        then the last scrape interval before the end is extrapolated, as PromQL does at any edge)."""
        deadline = time.monotonic() + self._ingest_wait_s
        while time.monotonic() < deadline:
            latest = scalar(await self.query(latest_sample_query(route)))
            if latest is not None and latest >= end_s:
                return
            await asyncio.sleep(INGEST_POLL_S)


def scalar(result: Sequence[Mapping[str, Any]]) -> float | None:
    """The value of a one-element instant vector (None when empty or NaN)."""
    if not result:
        return None
    value = float(result[0]["value"][1])
    return value if not math.isnan(value) else None


class ClockReader(Protocol):
    """Reads one simulated engine's clock."""

    async def read(self, base_url: str) -> ClockReading: ...


class SimClockReader:
    """``GET <engine>/sim/stats``: the simulated engine's ``simulated_time_s``, stamped with the midpoint of
    the request on the monotonic wall clock."""

    def __init__(self, *, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self._http = _Http(timeout_s)

    async def read(self, base_url: str) -> ClockReading:
        sent = time.monotonic()
        try:
            async with self._http.session().get(base_url.rstrip("/") + "/sim/stats") as response:
                stats = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MetricsUnavailable(f"clock of the engine at {base_url}: {exc!r}") from None
        received = time.monotonic()
        return ClockReading(wall_s=(sent + received) / 2, simulated_s=float(stats["simulated_time_s"]))

    async def aclose(self) -> None:
        await self._http.aclose()
