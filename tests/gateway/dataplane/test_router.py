"""The router against scripted engines on loopback: routing, retries, streaming failures, limits, auth."""

import asyncio
import dataclasses
import json
import random
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from gateway.dataplane.auth import secret_digest
from gateway.dataplane.metrics_targets import read_targets
from gateway.dataplane.router import Router, RouterSettings
from gateway.dataplane.routing import Endpoint, PoolView, RouteSlo, RoutingTable
from gateway.dataplane.upstream import Timeouts
from tests.gateway.asgi_server import serve_asgi

MODEL = "llama-3-8b"
TIMEOUTS = Timeouts(connect_s=1.0, first_byte_s=5.0, idle_s=5.0, total_s=10.0)


class ScriptedEngine:
    """An engine on loopback whose behaviour a test sets: ok, slow, busy (503), or dying mid-stream."""

    def __init__(self, name, behaviour="ok"):
        self.name = name
        self.behaviour = behaviour
        self.received = []
        self.peers = []  # client (host, port) of each request: the same port twice means a reused connection
        self.cancelled = 0  # requests whose connection the router closed before the answer
        self.runner = None
        self.url = None

    async def start(self):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self):
        await self.runner.cleanup()

    async def handle(self, request):
        body = await request.json()
        self.received.append(body)
        self.peers.append(request.transport.get_extra_info("peername"))
        if self.behaviour == "multi":
            return await self.multi_token_stream(request, body)
        if self.behaviour == "slow_first":
            await asyncio.sleep(1.0)
        if self.behaviour == "busy":
            return web.json_response({"error": {"message": "busy"}}, status=503)
        try:
            if self.behaviour == "slow":
                await asyncio.sleep(1.0)
                if request.transport is None or request.transport.is_closing():
                    self.cancelled += 1  # the router dropped the connection: the engine would free the slot
            if not body.get("stream"):
                return web.json_response({"model": body["model"], "served_by": self.name,
                                          "choices": [{"message": {"content": "hi"}}],
                                          "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(4):
                if self.behaviour == "dies" and i == 2:
                    request.transport.close()
                    return resp
                if self.behaviour == "stalls" and i == 2:
                    await asyncio.sleep(2.0)
                    if request.transport is None or request.transport.is_closing():
                        self.cancelled += 1  # the router dropped the connection meanwhile
                        return resp
                chunk = {"choices": [{"delta": {"content": f"t{i}"}}], "served_by": self.name}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(0.01)
            await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            return resp
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def multi_token_stream(self, request, body):
        """Like an engine under load: several tokens per event, usage only when asked for."""
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("a b c", "d e f g"):
            chunk = {"choices": [{"delta": {"content": text}}], "usage": None}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.02)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class StaticControl:
    def __init__(self, table):
        self.table = table
        self.reports = []

    async def watch(self, epoch, version, timeout_s):
        if (epoch, version) == (self.table.epoch, self.table.version):
            await asyncio.sleep(timeout_s)
            return None
        return self.table

    async def report_inflight(self, router_id, epoch, version, inflight_by_pool):
        self.reports.append((epoch, version, inflight_by_pool))

    async def raw_status(self):
        return {"version": self.table.version}


def table_for(pools, routes):
    views = {pid: PoolView(pid, tp, len(eps), tuple(Endpoint(e.name, e.url) for e in eps))
             for pid, (tp, eps) in pools.items()}
    return RoutingTable(version=1, epoch="e1", model=MODEL, classes=("interactive", "batch"),
                        default_class="interactive", routes=routes, pools=views)


def one_pool(*engines):
    """Both classes routed to pool "pa" made of ``engines``."""
    return table_for({"pa": (1, list(engines))}, {"interactive": {"pa": 1.0}, "batch": {"pa": 1.0}})


async def start_router(table, **settings):
    settings.setdefault("timeouts", TIMEOUTS)
    router = Router(RouterSettings(**settings), StaticControl(table), rng=random.Random(11))
    return router


@pytest.fixture
async def engines():
    started = []

    async def make(name, behaviour="ok"):
        engine = await ScriptedEngine(name, behaviour).start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.stop()


async def post(session, url, body, **kwargs):
    async with session.post(url + "/v1/chat/completions", json=body, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def chat(stream=False, model=MODEL, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def metric(router, name, **labels):
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_weighted_split_alias_rewrite_and_metrics(engines):
    a, b = await engines("a"), await engines("b")
    router = await start_router(table_for({"pa": (1, [a]), "pb": (2, [b])},
                                          {"interactive": {"pa": 0.25, "pb": 0.75}, "batch": {"pa": 1.0}}))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        for _ in range(200):
            status, _, body = await post(session, url, chat(model=f"{MODEL}:interactive"))
            assert status == 200
        status, _, body = await post(session, url, chat(), headers={"x-workload-class": "batch"})
        assert json.loads(body)["served_by"] == "a"
    assert all(r["model"] == MODEL for r in a.received + b.received)  # alias removed upstream
    share_a = metric(router, "tpgate_requests_total", **{"class": "interactive", "pool": "pa", "status": "200"}) / 200
    assert share_a == pytest.approx(0.25, abs=0.08)
    assert metric(router, "tpgate_output_tokens_total", **{"class": "batch", "pool": "pa"}) == 2
    assert metric(router, "tpgate_route_weight_ratio", **{"class": "interactive", "pool": "pb"}) == 0.75


async def test_stream_is_relayed_event_by_event_with_usage(engines):
    a = await engines("a")
    router = await start_router(one_pool(a))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        async with session.post(url + "/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.headers["content-type"] == "text/event-stream"
            events = [line async for line in resp.content if line.strip()]
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:4]] == ["t0", "t1", "t2", "t3"]
    assert events[-1] == b"data: [DONE]\n"
    labels = {"class": "interactive", "pool": "pa"}
    assert metric(router, "tpgate_output_tokens_total", **labels) == 4  # from the usage chunk
    assert metric(router, "tpgate_time_to_first_token_seconds_count", **labels) == 1
    assert metric(router, "tpgate_time_per_output_token_seconds_count", **labels) == 1


async def test_refused_connections_are_retried_on_another_replica(engines):
    good = await engines("good")
    dead = await engines("dead")
    await dead.stop()  # its port now refuses connections
    router = await start_router(one_pool(good, dead))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        results = await asyncio.gather(*(post(session, url, chat(stream=i % 2 == 0)) for i in range(20)))
    assert [status for status, _, _ in results] == [200] * 20
    assert metric(router, "tpgate_upstream_retries_total", pool="pa") >= 1
    assert metric(router, "tpgate_upstream_errors_total", pool="pa", reason="connect") >= 1


async def test_busy_engine_is_retried_elsewhere(engines):
    busy, good = await engines("busy", "busy"), await engines("good")
    router = await start_router(one_pool(busy, good))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        statuses = [(await post(session, url, chat()))[0] for _ in range(10)]
    assert statuses == [200] * 10


async def test_all_replicas_down_is_a_502_in_openai_shape(engines):
    dead = await engines("dead")
    await dead.stop()
    router = await start_router(one_pool(dead))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        status, _, body = await post(session, url, chat())
    assert status == 502
    assert "no engine replica could serve the request" in json.loads(body)["error"]["message"]


async def test_failure_after_streaming_started_ends_with_error_event_and_done(engines):
    dying = await engines("dying", "dies")
    router = await start_router(one_pool(dying))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        async with session.post(url + "/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.status == 200
            events = [line async for line in resp.content if line.strip()]
    assert len(events) == 4  # two tokens, the error, [DONE]
    assert json.loads(events[2][6:])["error"]["type"] == "upstream_error"
    assert events[3] == b"data: [DONE]\n"
    assert metric(router, "tpgate_requests_total", **{"class": "interactive", "pool": "pa", "status": "502"}) == 1
    assert len(dying.received) == 1  # not retried once bytes reached the client


async def test_overload_gets_429_with_retry_after(engines):
    slow = await engines("slow", "slow")
    router = await start_router(one_pool(slow),
                                max_inflight_per_replica=1, queue_timeout_s=0.1, retry_after_s=3)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        first = asyncio.create_task(post(session, url, chat()))
        await asyncio.sleep(0.2)
        status, headers, body = await post(session, url, chat())
        assert (await first)[0] == 200
    assert status == 429
    assert headers["Retry-After"] == "3"
    assert metric(router, "tpgate_requests_total", **{"class": "interactive", "pool": "pa", "status": "429"}) == 1
    assert json.loads(body)["error"]["type"] == "rate_limit_error"


async def test_client_disconnect_cancels_the_upstream_request(engines):
    slow = await engines("slow", "slow")
    router = await start_router(one_pool(slow))
    async with serve_asgi(router) as url:
        await router.wait_for_table(2)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                await post(session, url, chat(), timeout=aiohttp.ClientTimeout(total=0.3))
        for _ in range(50):
            if slow.cancelled:
                break
            await asyncio.sleep(0.05)
    assert slow.cancelled == 1
    assert metric(router, "tpgate_requests_total", **{"class": "interactive", "pool": "pa", "status": "499"}) == 1
    assert router._gates["pa"].inflight == 0


async def test_no_healthy_replica_is_a_503(engines):
    router = await start_router(one_pool())
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        status, headers, _ = await post(session, url, chat())
        health = await session.get(url + "/health")
    assert status == 503 and "Retry-After" in headers
    assert health.status == 503


async def test_api_keys_and_their_default_class(engines):
    a, b = await engines("a"), await engines("b")
    router = await start_router(table_for({"pa": (1, [a]), "pb": (1, [b])},
                                          {"interactive": {"pa": 1.0}, "batch": {"pb": 1.0}}),
                                api_key_classes={secret_digest("sk-batch"): "batch", secret_digest("sk-any"): None})
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        missing = await post(session, url, chat())
        wrong = await post(session, url, chat(), headers={"Authorization": "Bearer sk-nope"})
        batch = await post(session, url, chat(), headers={"Authorization": "Bearer sk-batch"})
        default = await post(session, url, chat(), headers={"Authorization": "Bearer sk-any"})
        models = await session.get(url + "/v1/models")
    assert (missing[0], wrong[0]) == (401, 401)
    assert json.loads(missing[2])["error"]["code"] == "invalid_api_key"
    assert json.loads(batch[2])["served_by"] == "b"
    assert json.loads(default[2])["served_by"] == "a"
    assert models.status == 401


async def test_admin_status_needs_the_token(engines):
    router = await start_router(table_for({}, {}), admin_token_digest=secret_digest("admin-secret"))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        anonymous = await session.get(url + "/admin/status")
        wrong = await session.get(url + "/admin/status", headers={"Authorization": "Bearer nope"})
        ok = await session.get(url + "/admin/status", headers={"Authorization": "Bearer admin-secret"})
        assert (anonymous.status, wrong.status, ok.status) == (401, 403, 200)
        assert await ok.json() == {"version": 1}
    assert b"admin-secret" not in router.metrics.exposition()


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("POST", "/v1/chat/completions", b"{nope", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1]", 400, "must be a JSON object"),
    ("POST", "/v1/chat/completions", b'{"model": "gpt-4"}', 404, "does not exist"),
    ("POST", "/v1/chat/completions", b'{"model": "x", "pad": "' + b"x" * 5000 + b'"}', 413, "exceeds the limit"),
    ("GET", "/v1/chat/completions", b"", 405, "not allowed"),
    ("GET", "/v2/anything", b"", 404, "no route"),
])
async def test_bad_requests_get_openai_errors(engines, method, path, body, status, message):
    a = await engines("a")
    router = await start_router(one_pool(a),
                                max_body_bytes=4096)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        async with session.request(method, url + path, data=body) as resp:
            payload = await resp.json()
    assert resp.status == status
    assert message in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert a.received == []


async def stream_events(session, url, body, **kwargs):
    async with session.post(url + "/v1/chat/completions", json=body, **kwargs) as resp:
        return resp.status, dict(resp.headers), [line async for line in resp.content if line.strip()]


async def test_output_tokens_come_from_the_engines_usage_not_from_events(engines):
    engine = await engines("multi", "multi")
    router = await start_router(one_pool(engine))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        _, _, plain = await stream_events(session, url, chat(stream=True))
        _, _, asked = await stream_events(session, url, chat(stream=True, stream_options={"include_usage": True}))
    assert all(b'"choices": []' not in e for e in plain)  # the client did not ask: the usage chunk is stripped
    assert any(b'"choices": []' in e for e in asked)
    assert all(body["stream_options"]["include_usage"] is True for body in engine.received)  # always asked
    labels = {"class": "interactive", "pool": "pa"}
    assert metric(router, "tpgate_output_tokens_total", **labels) == 14  # 7 + 7, not 2 events + 2 events
    assert metric(router, "tpgate_prompt_tokens_total", **labels) == 10
    gap_sum = metric(router, "tpgate_time_per_output_token_seconds_sum", **labels)
    assert 0.02 / 6 * 2 <= gap_sum < 0.02 * 2  # (last - first event) / (7 - 1) per request


async def test_a_cleanly_finished_stream_leaves_its_connection_for_reuse(engines):
    engine = await engines("multi", "multi")
    router = await start_router(one_pool(engine))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        for _ in range(3):
            await stream_events(session, url, chat(stream=True))
    assert len(engine.peers) == 3 and len(set(engine.peers)) == 1


async def test_errors_answered_before_a_pool_was_chosen_are_counted(engines):
    a = await engines("a")
    router = await start_router(one_pool(a), max_body_bytes=4096)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        await post(session, url, chat(model="gpt-4"))
        await session.post(url + "/v1/chat/completions", data=b"{nope")
        await session.post(url + "/v1/chat/completions", data=b'{"pad": "' + b"x" * 5000 + b'"}')
        await post(session, url, chat(), headers={"x-workload-class": "nightly"})
    none = {"class": "none", "pool": "none"}
    assert metric(router, "tpgate_requests_total", **none, status="404") == 1
    assert metric(router, "tpgate_requests_total", **none, status="400") == 2
    assert metric(router, "tpgate_requests_total", **none, status="413") == 1


async def test_series_of_pools_and_trial_routes_that_left_the_table_are_removed(engines):
    a, b = await engines("a"), await engines("b")
    with_trial = table_for({"pa": (1, [a]), "trial-pool": (1, [b])},
                           {"interactive": {"pa": 1.0}, "batch": {"pa": 1.0}, "trial-1": {"trial-pool": 1.0}})
    router = await start_router(with_trial)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        for _ in range(3):
            await post(session, url, chat(), headers={"x-workload-class": "trial-1"})
            await post(session, url, chat())
    assert b"trial-pool" in router.metrics.exposition()
    router.apply_table(dataclasses.replace(one_pool(a), version=2))
    exposition = router.metrics.exposition()
    assert b"trial-pool" not in exposition and b"trial-1" not in exposition
    assert metric(router, "tpgate_requests_total", **{"class": "interactive", "pool": "pa", "status": "200"}) == 3


async def test_a_connect_timeout_is_retried_like_a_refused_connection(engines):
    good = await engines("good")
    with socket.socket() as black_hole:  # accepts nothing, and its queue is full: connecting hangs
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(0)
        port = black_hole.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        hanging = ScriptedEngine("hanging")
        hanging.url = f"http://127.0.0.1:{port}"
        timeouts = Timeouts(connect_s=0.3, first_byte_s=5.0, idle_s=5.0, total_s=10.0)
        router = await start_router(one_pool(hanging, good), timeouts=timeouts)
        async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
            await router.wait_for_table(2)
            statuses = [(await post(session, url, chat()))[0] for _ in range(6)]
        for filler in fillers:
            filler.close()
    assert statuses == [200] * 6
    assert metric(router, "tpgate_upstream_errors_total", pool="pa", reason="connect") >= 1


async def test_first_byte_and_idle_timeouts_are_separate(engines):
    slow_first, stalls = await engines("slow_first", "slow_first"), await engines("stalls", "stalls")
    timeouts = Timeouts(connect_s=1.0, first_byte_s=3.0, idle_s=0.5, total_s=10.0)
    router = await start_router(table_for({"slow": (1, [slow_first]), "stalling": (1, [stalls])},
                                          {"interactive": {"slow": 1.0}, "batch": {"stalling": 1.0}}),
                                timeouts=timeouts)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        status, _, events = await stream_events(session, url, chat(stream=True))  # 1 s to the first byte: fine
        assert status == 200 and events[-1] == b"data: [DONE]\n" and b"error" not in b"".join(events)
        _, _, broken = await stream_events(session, url, chat(stream=True), headers={"x-workload-class": "batch"})
    assert json.loads(broken[-2][6:])["error"]["type"] == "upstream_error"  # 2 s of silence > 0.5 s idle
    assert metric(router, "tpgate_requests_total", **{"class": "batch", "pool": "stalling", "status": "502"}) == 1


async def test_health_reflects_production_routes_only(engines):
    a = await engines("a")
    table = table_for({"pa": (1, [a]), "starting": (1, [])},
                      {"interactive": {"pa": 1.0}, "batch": {"pa": 1.0}, "trial-1": {"starting": 1.0}})
    router = await start_router(table)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        health = await session.get(url + "/health")
        assert health.status == 200 and (await health.json())["routes"] == {"interactive": True, "batch": True}


class SilentControl(StaticControl):
    """A controller that never answers (not yet up)."""

    async def watch(self, epoch, version, timeout_s):
        await asyncio.sleep(timeout_s)
        return None


async def test_before_the_first_table_requests_get_503_with_retry_after():
    router = Router(RouterSettings(timeouts=TIMEOUTS, retry_after_s=2), SilentControl(RoutingTable()))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        status, headers, body = await post(session, url, chat())
        health = await session.get(url + "/health")
        models = await session.get(url + "/v1/models")
    assert status == 503 and headers["Retry-After"] == "2" and json.loads(body)["error"]["code"] == "starting"
    assert health.status == 503 and models.status == 503


async def test_responses_say_which_class_and_pool_served_them(engines):
    a = await engines("a")
    router = await start_router(one_pool(a))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        _, plain, _ = await post(session, url, chat(), headers={"x-workload-class": "batch"})
        _, streamed, _ = await stream_events(session, url, chat(stream=True))
        _, refused, _ = await post(session, url, chat(model="gpt-4"))
    assert (plain["x-tpgate-class"], plain["x-tpgate-pool"]) == ("batch", "pa")
    assert (streamed["x-tpgate-class"], streamed["x-tpgate-pool"]) == ("interactive", "pa")
    assert "x-tpgate-pool" not in refused


async def test_reports_count_waiters_under_the_table_version(engines):
    slow = await engines("slow", "slow")
    router = await start_router(one_pool(slow), max_inflight_per_replica=1, queue_timeout_s=3.0)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        requests = [asyncio.create_task(post(session, url, chat())) for _ in range(2)]
        await asyncio.sleep(0.7)
        reports = list(router._control.reports)
        await asyncio.gather(*requests)
    assert ("e1", 1, {"pa": 2}) in reports  # one in flight, one waiting at the gate


class FlakyControl(StaticControl):
    """Fails while ``down``, then serves ``table``."""

    def __init__(self, table):
        super().__init__(table)
        self.down = False

    async def watch(self, epoch, version, timeout_s):
        if self.down:
            raise ConnectionError("controller restarting")
        return await super().watch(epoch, version, min(timeout_s, 0.1))


async def test_router_keeps_its_table_while_the_controller_is_away_and_takes_a_new_epoch(engines, monkeypatch):
    monkeypatch.setattr("gateway.dataplane.router.CONTROLLER_RETRY_S", 0.05)
    a = await engines("a")
    control = FlakyControl(dataclasses.replace(one_pool(a), version=7))
    router = Router(RouterSettings(timeouts=TIMEOUTS), control, rng=random.Random(1))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        control.down = True
        await asyncio.sleep(0.3)
        assert (await post(session, url, chat()))[0] == 200  # served on the last table
        control.table = dataclasses.replace(one_pool(a), epoch="e2", version=3)  # restarted: lower version
        control.down = False
        for _ in range(40):
            if router.table.epoch == "e2":
                break
            await asyncio.sleep(0.05)
    assert (router.table.epoch, router.table.version) == ("e2", 3)


async def test_slo_met_requests_are_judged_in_the_engines_clock(engines):
    a = await engines("a")
    fast = dataclasses.replace(one_pool(a), slos={"interactive": RouteSlo(e2e_s=5.0), "batch": RouteSlo(e2e_s=1e-7)})
    router = await start_router(fast)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        await post(session, url, chat())
        await post(session, url, chat(), headers={"x-workload-class": "batch"})
    assert metric(router, "tpgate_slo_met_requests_total", **{"class": "interactive", "pool": "pa"}) == 1
    assert metric(router, "tpgate_slo_met_requests_total", **{"class": "batch", "pool": "pa"}) == 0
    scaled = dataclasses.replace(fast, pools={"pa": dataclasses.replace(fast.pools["pa"], time_scale=1e6)})
    router._control.table = dataclasses.replace(scaled, version=2)
    router.apply_table(router._control.table)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await post(session, url, chat())  # milliseconds of wall time are ages of engine time at this scale
    assert metric(router, "tpgate_slo_met_requests_total", **{"class": "interactive", "pool": "pa"}) == 1


class RecordingSurface:
    """An admin surface that answers 200 and records what reached it, and when it was started and stopped."""

    def __init__(self):
        self.paths, self.events = [], []

    async def __call__(self, scope, receive, send):
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"admin"})

    async def start(self):
        self.events.append("start")

    async def stop(self):
        self.events.append("stop")


async def test_admin_paths_go_to_the_admin_surface_and_live_with_the_router(engines):
    surface = RecordingSurface()
    router = Router(RouterSettings(timeouts=TIMEOUTS, admin_token_digest=secret_digest("admin-secret")),
                    StaticControl(table_for({}, {})), admin=surface)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        state = await session.get(url + "/admin/state")
        status = await session.get(url + "/admin/status", headers={"Authorization": "Bearer admin-secret"})
        other = await session.get(url + "/v2/anything")
        assert (state.status, await state.text()) == (200, "admin")
        assert (await status.json()) == {"version": 1} and other.status == 404
    assert surface.paths == ["/admin/state"]  # /admin/status stays the router's own; /v2 is not admin
    assert surface.events == ["start", "stop"]


def stopping(router, phase):
    router.apply_table(dataclasses.replace(router.table, version=router.table.version + 1, stop_phase=phase))


async def read_events(resp, count):
    events = []
    while len(events) < count:
        line = await resp.content.readline()
        assert line, f"the stream ended after {events}"
        if line.strip():
            events.append(line)
    return events


async def test_a_draining_gateway_refuses_new_requests_and_lets_streams_in_flight_finish(engines):
    stalling = await engines("stalling", "stalls")  # two events, a 2 s pause, two more
    router = await start_router(one_pool(stalling), retry_after_s=4)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        async with session.post(url + "/v1/chat/completions", json=chat(stream=True)) as resp:
            first = await read_events(resp, 2)
            stopping(router, "draining")
            status, headers, body = await post(session, url, chat())
            async with session.get(url + "/health") as health:
                health_status, health_body = health.status, await health.json()
            async with session.get(url + "/v1/models") as models:
                models_status = models.status
            rest = [line async for line in resp.content if line.strip()]
    assert (status, headers["Retry-After"]) == (503, "4")
    assert json.loads(body)["error"] == {"message": "the gateway is stopping", "type": "service_unavailable_error",
                                         "param": None, "code": "stopping"}
    assert (health_status, health_body["reason"]) == (503, "the gateway is stopping")
    assert models_status == 503
    contents = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in first + rest[:2]]
    assert contents == ["t0", "t1", "t2", "t3"]  # the stream in flight ran to its end
    assert rest[-1] == b"data: [DONE]\n"
    assert len(stalling.received) == 1


async def test_an_ending_gateway_ends_streams_with_an_error_event_and_done(engines):
    stalling = await engines("stalling", "stalls")
    router = await start_router(one_pool(stalling))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        async with session.post(url + "/v1/chat/completions", json=chat(stream=True)) as resp:
            await read_events(resp, 2)
            stopping(router, "draining")
            stopping(router, "ending")
            rest = [line async for line in asyncio_timeout_lines(resp)]
        for _ in range(60):  # after its stall, the engine finds the connection closed: its request is cancelled
            if stalling.cancelled:
                break
            await asyncio.sleep(0.05)
    assert len(rest) == 2
    assert json.loads(rest[0][6:])["error"]["code"] == "stopping"
    assert rest[1] == b"data: [DONE]\n"
    assert stalling.cancelled == 1
    assert metric(router, "tpgate_requests_total", **{"class": "interactive", "pool": "pa", "status": "503"}) == 1


async def asyncio_timeout_lines(resp):
    """The rest of a stream's non-empty lines; fails if they do not come within a second (no 2 s stall)."""
    async with asyncio.timeout(1.0):
        async for line in resp.content:
            if line.strip():
                yield line


async def test_an_ending_gateway_answers_requests_still_waiting_for_the_engine_with_503(engines):
    slow = await engines("slow", "slow")  # answers after a second
    router = await start_router(one_pool(slow))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        waiting = asyncio.create_task(post(session, url, chat()))
        await asyncio.sleep(0.3)
        stopping(router, "ending")
        status, headers, body = await asyncio.wait_for(waiting, 0.5)
    assert status == 503
    assert json.loads(body)["error"]["code"] == "stopping"
    assert headers["x-tpgate-pool"] == "pa"
    assert router._active == {}


async def test_serve_names_the_path_of_each_request_in_its_access_log(engines):
    from ray.serve._private.thirdparty.get_asgi_route_name import get_asgi_route_name

    router = await start_router(one_pool(await engines("a")))
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "", "headers": []}
    assert get_asgi_route_name(router, scope) == "/v1/chat/completions"
    assert get_asgi_route_name(router, {**scope, "method": "GET", "path": "/v1/models"}) == "/v1/models"
    assert {(tuple(route.methods), route.path) for route in router.routes} >= {(("POST",), "/v1/completions"),
                                                                                (("GET",), "/health")}


async def test_latency_counts_from_the_front_doors_stamp(engines):
    """A request the front (HAProxy) received 0.4 s before the router started on it: TTFT and e2e include the
    0.4 s, and the wait is exported on its own."""
    a = await engines("a")
    router = await start_router(one_pool(a), front_stamps=True)
    labels = {"class": "interactive", "pool": "pa"}
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        stamp = str(int((time.time() - 0.4) * 1e6))
        async with session.post(url + "/v1/chat/completions", json=chat(stream=True),
                                headers={"x-tpgate-front-received-us": stamp}) as resp:
            assert resp.status == 200
            await resp.read()
    assert metric(router, "tpgate_front_wait_seconds_sum", **labels) == pytest.approx(0.4, abs=0.1)
    assert metric(router, "tpgate_time_to_first_token_seconds_sum", **labels) >= 0.4
    assert metric(router, "tpgate_request_duration_seconds_sum", **labels) >= 0.4


async def test_without_a_stamping_front_a_clients_stamp_is_ignored(engines):
    a = await engines("a")
    router = await start_router(one_pool(a))  # the standard proxy: nothing in front stamps requests
    labels = {"class": "interactive", "pool": "pa"}
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        stamp = str(int((time.time() - 30) * 1e6))
        status, _, _ = await post(session, url, chat(), headers={"x-tpgate-front-received-us": stamp})
    assert status == 200
    assert metric(router, "tpgate_front_wait_seconds_count", **labels) == 0
    assert metric(router, "tpgate_request_duration_seconds_sum", **labels) < 5


async def test_each_replica_serves_its_own_metrics_and_lists_itself_for_prometheus(engines, tmp_path):
    a = await engines("a")
    router = await start_router(one_pool(a), metrics_targets_dir=str(tmp_path / "targets"))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        assert (await post(session, url, chat()))[0] == 200
        [target] = read_targets(tmp_path / "targets")
        [path] = (tmp_path / "targets").glob("tpgate-router-*.json")
        assert json.loads(path.read_text())[0]["labels"]["tpgate_router"] in path.name
        async with session.get(f"http://{target}/metrics") as resp:
            text = await resp.text()
    assert 'tpgate_requests_total{class="interactive",pool="pa",status="200"} 1.0' in text
    assert list((tmp_path / "targets").iterdir()) == []  # removed when the replica stopped


async def test_a_pool_whose_engines_require_a_key_gets_it_from_the_router_never_the_clients():
    from gateway.engines.sim.config import SimEngineConfig, resolve
    from gateway.engines.sim.server import build_app

    setup = resolve(SimEngineConfig.from_values({"model": MODEL, "time_scale": 1000}))
    runner = web.AppRunner(build_app(setup, api_keys=("pool-key",)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    keyed = PoolView("pa", 1, 1, (Endpoint("r1", engine_url),), api_key="pool-key")
    assert "pool-key" not in repr(keyed)  # tables and pools are logged; the key is not
    table = RoutingTable(version=1, epoch="e1", model=MODEL, classes=("interactive",), default_class="interactive",
                         routes={"interactive": {"pa": 1.0}}, pools={"pa": keyed})
    router = await start_router(table, api_key_classes={secret_digest("sk-client"): None},
                                admin_token_digest=secret_digest("admin"))
    admin = {"Authorization": "Bearer admin"}
    try:
        async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
            await router.wait_for_table(2)
            served = await post(session, url, chat(max_tokens=2), headers={"Authorization": "Bearer sk-client"})
            assert served[0] == 200, served
            # Prometheus scrapes such an engine through the gateway, which holds the key
            async with session.get(url + "/admin/engine-targets", headers=admin) as resp:
                [group] = await resp.json()
            gateway_address = url.split("://")[1]
            assert group["targets"] == [gateway_address] and group["labels"]["engine"] == engine_url.split("//")[1]
            assert group["labels"]["__metrics_path__"] == "/admin/engine-metrics"
            query = {"pool": group["labels"]["__param_pool"], "replica": group["labels"]["__param_replica"]}
            async with session.get(url + "/admin/engine-metrics", params=query, headers=admin) as resp:
                assert resp.status == 200 and "lmdeploy:" in await resp.text()
            async with session.get(url + "/admin/engine-metrics", params=query) as resp:
                assert resp.status == 401
            async with session.get(url + "/admin/engine-metrics", params={"pool": "pa", "replica": "no"},
                                   headers=admin) as resp:
                assert resp.status == 404
            wrong_key = dataclasses.replace(keyed, api_key="wrong")
            router.apply_table(dataclasses.replace(table, version=2, pools={"pa": wrong_key}))
            refused = await post(session, url, chat(max_tokens=2), headers={"Authorization": "Bearer sk-client"})
    finally:
        await runner.cleanup()
    assert refused[0] == 502  # the engine's 401 is the gateway's fault, not the client's
    assert "engine key" in json.loads(refused[2])["error"]["message"]
    assert metric(router, "tpgate_upstream_errors_total", pool="pa", reason="status") >= 1
