"""Small real HTTP servers for the tuner's integration tests: the gateway's metrics, and steady traffic."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
from aiohttp import web

from loadtests.stream import StreamTally
from tests.processes import free_port
from tests.tuner.traffic import GatewayTraffic

# a fixed cycle of request shapes: (e2e, ttft, tpot seconds, output tokens, met the SLOs)
SHAPES = ((0.30, 0.020, 0.0020, 120, True), (0.45, 0.035, 0.0030, 130, True), (0.80, 0.060, 0.0055, 140, False),
          (0.25, 0.015, 0.0018, 110, True), (1.60, 0.250, 0.0090, 150, False))


@contextlib.asynccontextmanager
async def metrics_server(traffic: GatewayTraffic) -> AsyncIterator[str]:
    """``GET /metrics`` of ``traffic`` on a free loopback port; yields the base URL."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=traffic.exposition(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with serving(app) as url:
        yield url


async def steady_traffic(traffic: GatewayTraffic, route: str, pool: str, *, per_tick: int = 3,
                         tick_s: float = 0.05, shapes: Sequence[tuple[float, float, float, int, bool]] = SHAPES,
                         errors_every: int = 40) -> None:
    """Record ``per_tick`` requests every ``tick_s`` until cancelled (one error response every ``errors_every``)."""
    cycle = itertools.cycle(shapes)
    for n in itertools.count(1):
        for _ in range(per_tick):
            e2e, ttft, tpot, tokens, met = next(cycle)
            if n % errors_every == 0:
                traffic.request(route, pool, e2e_s=e2e, status="503")
            traffic.request(route, pool, e2e_s=e2e, ttft_s=ttft, tpot_s=tpot, output_tokens=tokens, slo_met=met)
        await asyncio.sleep(tick_s)


@contextlib.asynccontextmanager
async def mini_gateway(traffic: GatewayTraffic, engine_url: str, pool_of: Callable[[str], str]
                       ) -> AsyncIterator[str]:
    """A one-hop streaming proxy in front of one engine that records each request the way the router does
    (route from ``x-workload-class``, pool from ``pool_of(route)``; wall-clock TTFT, TPOT and e2e), and serves
    those metrics on ``/metrics``. Yields its base URL."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))

    async def models(request: web.Request) -> web.Response:
        async with session.get(f"{engine_url}/v1/models") as upstream:
            return web.json_response(await upstream.json())

    async def chat(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.headers.get("x-workload-class", "none")
        body = await request.read()
        tally = StreamTally(api="chat")
        async with session.post(f"{engine_url}/v1/chat/completions", data=body,
                                headers={"content-type": "application/json"}) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            async for line in upstream.content:
                tally.feed_line(line.decode(), time.perf_counter())
                await response.write(line)
            await response.write_eof()
        e2e = time.perf_counter() - started
        tokens = tally.output_tokens
        ttft = None if tally.first_token_s is None else tally.first_token_s - started
        tpot = None
        if tally.first_token_s is not None and tally.last_token_s is not None and tokens > 1:
            tpot = (tally.last_token_s - tally.first_token_s) / (tokens - 1)
        status = "200" if upstream.status == 200 and tally.failure() is None else str(upstream.status)
        traffic.request(route, pool_of(route), e2e_s=e2e, ttft_s=ttft, tpot_s=tpot, status=status,
                        output_tokens=tokens, prompt_tokens=tally.usage_prompt_tokens or 0)
        return response

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=traffic.exposition(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    try:
        async with serving(app) as url:
            yield url
    finally:
        await session.close()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
