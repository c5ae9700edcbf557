"""End to end: the official OpenAI client against a real `tpgate serve` with simulated engines in two pools at
different TP sizes behind one weighted route."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, BATCH_KEY
from tests.processes import alive, cmdline, engine_pids, parent_pid, wait_until

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def requests_by_pool(gateway, route):
    counts = {}
    for family in text_string_to_metric_families(gateway.metrics()):
        for sample in family.samples:
            if sample.name == "tpgate_requests_total" and sample.labels["class"] == route:
                counts[sample.labels["pool"]] = counts.get(sample.labels["pool"], 0) + sample.value
    return counts


def test_models_lists_the_model_and_class_aliases(client):
    assert [m.id for m in client.models.list()] == [MODEL, f"{MODEL}:interactive", f"{MODEL}:batch"]


def test_chat_completion(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=12)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 0


def test_completion(client):
    reply = client.completions.create(model=f"{MODEL}:batch", prompt="Once upon a time", max_tokens=5)
    assert reply.model == MODEL
    assert reply.usage.completion_tokens == 5


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                            max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_weighted_route_splits_traffic_between_tp_sizes(gateway, client):
    before = requests_by_pool(gateway, "interactive")
    for _ in range(200):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       extra_headers={"x-workload-class": "interactive"})
    after = requests_by_pool(gateway, "interactive")
    served = {pool: after.get(pool, 0) - before.get(pool, 0) for pool in after}
    assert served["small-tp1"] + served["big-tp2"] == 200
    # a fair coin lands within 100 +- 25 heads in 200 throws with probability > 99.9 %
    assert 75 <= served["small-tp1"] <= 125, served


def test_api_key_default_class(gateway):
    batch_client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=BATCH_KEY, max_retries=0)
    before = requests_by_pool(gateway, "batch")
    batch_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    after = requests_by_pool(gateway, "batch")
    assert sum(after.values()) - sum(before.values()) == 1


def test_auth_errors(gateway):
    anonymous = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        anonymous.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"


def test_bad_input_is_400(gateway, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-5)
    assert "max_tokens" in info.value.message
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=b"{oops", method="POST",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=10)
    with raw.value as response:
        assert response.code == 400
        assert json.loads(response.read())["error"]["type"] == "invalid_request_error"


def test_overload_is_429_with_retry_after(gateway, client):
    # big-tp2 has one replica: 8 in flight, then a 0.2 s wait, then 429
    def long_request():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=2000, extra_headers={"x-workload-class": "interactive"})
            return 200
        except openai.RateLimitError as exc:
            assert exc.response.headers["retry-after"] == "1"
            return 429

    with ThreadPoolExecutor(max_workers=48) as pool:
        statuses = list(pool.map(lambda _: long_request(), range(48)))
    assert statuses.count(429) > 0
    assert statuses.count(200) >= 16  # every slot of both pools was used


def test_admin_status_needs_a_token(gateway):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(gateway.url + "/admin/status", timeout=10)
    with info.value as response:
        assert response.code == 401
    status = gateway.status()
    assert {p: (v["tp"], v["replicas"]) for p, v in status["pools"].items()} == {"small-tp1": (1, 2),
                                                                                 "big-tp2": (2, 1)}
    assert gateway.admin_token not in gateway.metrics()


def test_killed_engine_loses_no_request_that_had_not_started_streaming(gateway, client):
    ports = {int(u.rsplit(":", 1)[1]) for u in gateway.status()["pools"]["small-tp1"]["endpoints"].values()}
    victim = next(iter(engine_pids(ports)))
    results, errors = [], []
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(model=f"{MODEL}:batch", max_tokens=50,
                                                       messages=[{"role": "user", "content": "load"}])
                results.append(reply.usage.completion_tokens)
            except openai.APIError as exc:  # pragma: no cover - the assertion below reports it
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    os.kill(victim, signal.SIGKILL)
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(results) > 20 and set(results) == {50}
    # Serve sees the failed health check and replaces the replica with a fresh engine
    wait_until(gateway.all_ready, timeout_s=90, what="the pool to be whole again")
    assert victim not in engine_pids(gateway.engine_ports())


def test_engine_dies_with_its_replica_even_on_sigkill(gateway):
    ports = {int(u.rsplit(":", 1)[1]) for u in gateway.status()["pools"]["big-tp2"]["endpoints"].values()}
    engine = next(iter(engine_pids(ports)))
    replica = parent_pid(engine)
    assert replica is not None and "ServeReplica" in " ".join(cmdline(replica))
    os.kill(replica, signal.SIGKILL)
    wait_until(lambda: not alive(engine), timeout_s=15, what="the orphaned engine to exit")
    wait_until(gateway.all_ready, timeout_s=90, what="Serve to replace the replica")
