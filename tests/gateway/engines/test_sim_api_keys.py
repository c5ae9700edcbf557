"""The simulated engine's ``--api-keys``, as LMDeploy 0.18's: a bearer token from the list is needed everywhere but
on OPTIONS and under /health, /docs, /redoc and /nodes (so /metrics needs it too); without one, 401. The
simulator's own clock statistics (/sim/stats, read by the tuner) are open too."""

import aiohttp
import pytest
from aiohttp import web

from gateway.engines.sim.config import SimEngineConfig, resolve
from gateway.engines.sim.server import build_app

KEY = "pool-secret-1"
CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def engine():
    setup = resolve(SimEngineConfig.from_values({"model": "llama-3-8b", "time_scale": 1000}))
    runner = web.AppRunner(build_app(setup, api_keys=(KEY, "other-key")))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None), ("GET", "/metrics", None),
])
async def test_without_a_listed_key_requests_are_401(engine, method, path, body):
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            async with session.request(method, engine + path, json=body, headers=headers) as resp:
                assert resp.status == 401, (path, headers)
                assert (await resp.json())["error"]["code"] == "unauthorized"
        async with session.request(method, engine + path, json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200


@pytest.mark.parametrize("path", ["/health", "/sim/stats"])
async def test_health_and_the_simulators_clock_need_no_key(engine, path):
    async with aiohttp.ClientSession() as session, session.get(engine + path) as resp:
        assert resp.status == 200


def test_without_keys_nothing_is_required():
    setup = resolve(SimEngineConfig.from_values({"model": "llama-3-8b"}))
    assert len(build_app(setup).middlewares) == len(build_app(setup, api_keys=("",)).middlewares) == 1
    assert len(build_app(setup, api_keys=(KEY,)).middlewares) == 2
