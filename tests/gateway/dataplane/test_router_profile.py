"""The router's live-profile series: arrivals by API and streaming, requests in flight per class, and the token
counts of each successful request (from the engine's usage)."""

import asyncio
import dataclasses

import aiohttp

from gateway.dataplane.auth import secret_digest
from tests.gateway.asgi_server import serve_asgi
from tests.gateway.dataplane.test_router import chat, engines, metric, one_pool, post, start_router, table_for

__all__ = ["engines"]  # the fixture, imported for these tests


async def test_arrivals_streaming_and_token_counts_per_class(engines):
    a = await engines("a")
    router = await start_router(one_pool(a))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        for _ in range(3):
            assert (await post(session, url, chat(stream=True), headers={"x-workload-class": "batch"}))[0] == 200
        assert (await post(session, url, chat(), headers={"x-workload-class": "batch"}))[0] == 200
        async with session.post(url + "/v1/completions", json={"model": "llama-3-8b", "prompt": "hi"}) as resp:
            assert resp.status == 200
    batch = {"class": "batch"}
    assert metric(router, "tpgate_arrivals_total", **batch, api="chat", stream="true") == 3
    assert metric(router, "tpgate_arrivals_total", **batch, api="chat", stream="false") == 1
    assert metric(router, "tpgate_arrivals_total", **{"class": "interactive"}, api="completions",
                  stream="false") == 1
    assert metric(router, "tpgate_request_prompt_tokens_count", **batch) == 4
    assert metric(router, "tpgate_request_prompt_tokens_sum", **batch) == 12  # 3 tokens each, from usage
    assert metric(router, "tpgate_request_output_tokens_sum", **batch) == 3 * 4 + 2
    assert metric(router, "tpgate_request_output_tokens_bucket", **batch, le="4.0") == 4
    assert metric(router, "tpgate_request_output_tokens_bucket", **batch, le="2.0") == 1
    assert metric(router, "tpgate_class_inflight_requests", **batch) == 0


async def test_requests_in_flight_are_counted_per_class_until_they_finish(engines):
    slow = await engines("slow", "slow")
    router = await start_router(one_pool(slow))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        pending = [asyncio.create_task(post(session, url, chat(), headers={"x-workload-class": "batch"}))
                   for _ in range(3)]
        await asyncio.sleep(0.5)
        assert metric(router, "tpgate_class_inflight_requests", **{"class": "batch"}) == 3
        assert metric(router, "tpgate_class_inflight_requests", **{"class": "interactive"}) == 0
        await asyncio.gather(*pending)
    assert metric(router, "tpgate_class_inflight_requests", **{"class": "batch"}) == 0


async def test_failed_requests_count_as_arrivals_but_not_as_lengths(engines):
    busy = await engines("busy", "busy")
    router = await start_router(one_pool(busy), max_attempts=1)
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        status, _, _ = await post(session, url, chat())
        assert status == 502
    interactive = {"class": "interactive"}
    assert metric(router, "tpgate_arrivals_total", **interactive, api="chat", stream="false") == 1
    assert metric(router, "tpgate_request_output_tokens_count", **interactive) == 0
    assert metric(router, "tpgate_class_inflight_requests", **interactive) == 0


async def test_class_series_of_trial_routes_that_left_the_table_are_removed(engines):
    a = await engines("a")
    with_trial = table_for({"pa": (1, [a])}, {"interactive": {"pa": 1.0}, "batch": {"pa": 1.0},
                                               "trial-1": {"pa": 1.0}})
    router = await start_router(with_trial, admin_token_digest=secret_digest("admin-token"))
    async with serve_asgi(router) as url, aiohttp.ClientSession() as session:
        await router.wait_for_table(2)
        trial = {"x-workload-class": "trial-1", "authorization": "Bearer admin-token"}  # trial routes: admin only
        await post(session, url, chat(), headers=trial)
        await post(session, url, chat())
    assert metric(router, "tpgate_arrivals_total", **{"class": "trial-1"}, api="chat", stream="false") == 1
    router.apply_table(dataclasses.replace(one_pool(a), version=2))
    exposition = router.metrics.exposition().decode()
    assert 'class="trial-1"' not in exposition
    assert metric(router, "tpgate_arrivals_total", **{"class": "interactive"}, api="chat", stream="false") == 1
