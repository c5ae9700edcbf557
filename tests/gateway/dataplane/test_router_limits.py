"""The router against hostile and unauthorised input: trial routes need the admin token, bodies are bounded in
size, nesting and time (a client trickling its body is cut off with 408)."""

import asyncio
import json

import aiohttp
import pytest

from gateway.dataplane.auth import secret_digest
from tests.gateway.asgi_server import serve_asgi
from tests.gateway.dataplane.test_router import ScriptedEngine, chat, metric, post, start_router, table_for

ADMIN = "admin-secret"
TRIAL = "trial-study-1"


@pytest.fixture
async def engines():
    started = []

    async def make(name):
        started.append(await ScriptedEngine(name).start())
        return started[-1]

    yield make
    for engine in started:
        await engine.stop()


def with_trial(a, b):
    return table_for({"pa": (1, [a]), "trial-pool": (1, [b])},
                     {"interactive": {"pa": 1.0}, "batch": {"pa": 1.0}, TRIAL: {"trial-pool": 1.0}})


async def test_trial_routes_answer_only_the_admin_token_also_when_api_keys_are_configured(engines):
    a, b = await engines("a"), await engines("b")
    router = await start_router(with_trial(a, b), api_key_classes={secret_digest("sk-user"): None},
                                admin_token_digest=secret_digest(ADMIN))
    trial = {"x-workload-class": TRIAL}
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        user = await post(session, url, chat(), headers={**trial, "Authorization": "Bearer sk-user"})
        anonymous = await post(session, url, chat(), headers=trial)
        admin = await post(session, url, chat(), headers={**trial, "Authorization": f"Bearer {ADMIN}"})
        admin_production = await post(session, url, chat(), headers={"Authorization": f"Bearer {ADMIN}"})
    assert user[0] == 403 and json.loads(user[2])["error"]["code"] == "trial_route_forbidden"
    assert anonymous[0] == 401  # API keys are configured: no key, no answer at all
    assert admin[0] == 200 and json.loads(admin[2])["served_by"] == "b"
    assert admin_production[0] == 200 and json.loads(admin_production[2])["served_by"] == "a"
    assert len(b.received) == 1  # the ordinary key never reached the pool under measurement


async def test_without_api_keys_a_trial_route_still_needs_the_admin_token(engines):
    a, b = await engines("a"), await engines("b")
    router = await start_router(with_trial(a, b), admin_token_digest=secret_digest(ADMIN))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        anonymous = await post(session, url, chat(), headers={"x-workload-class": TRIAL})
        wrong = await post(session, url, chat(), headers={"x-workload-class": TRIAL, "Authorization": "Bearer x"})
    assert (anonymous[0], wrong[0]) == (403, 403) and not b.received


async def test_a_body_that_trickles_in_is_cut_off_with_408_and_frees_the_slot(engines):
    a = await engines("a")
    router = await start_router(table_for({"pa": (1, [a])}, {"interactive": {"pa": 1.0}, "batch": {"pa": 1.0}}),
                                body_read_timeout_s=0.5)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"model\"")  # then nothing more
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        ok = await post(session, url, chat())
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
    assert ok[0] == 200
    assert metric(router, "tpgate_requests_total", **{"class": "none", "pool": "none", "status": "408"}) == 1


async def test_deep_nesting_and_a_bad_content_length_are_400_before_any_engine(engines):
    a = await engines("a")
    router = await start_router(table_for({"pa": (1, [a])}, {"interactive": {"pa": 1.0}, "batch": {"pa": 1.0}}),
                                max_json_depth=16)
    deep = b'{"model": "llama-3-8b", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        nested = await session.post(url + "/v1/chat/completions", data=deep)
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n")
        await writer.drain()
        bad_length = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
    assert nested.status == 400 and "deeper than the limit of 16" in (await nested.json())["error"]["message"]
    assert bad_length.startswith(b"HTTP/1.1 400")
    assert not a.received


async def test_engine_targets_for_prometheus_need_the_admin_token(engines):
    a, b = await engines("a"), await engines("b")
    router = await start_router(with_trial(a, b), admin_token_digest=secret_digest(ADMIN))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        anonymous = await session.get(url + "/admin/engine-targets")
        admin = await session.get(url + "/admin/engine-targets", headers={"Authorization": f"Bearer {ADMIN}"})
        groups = await admin.json()
    assert anonymous.status == 401
    assert sorted((g["targets"], g["labels"]["pool"]) for g in groups) == sorted(
        [([a.url.removeprefix("http://")], "pa"), ([b.url.removeprefix("http://")], "trial-pool")])
