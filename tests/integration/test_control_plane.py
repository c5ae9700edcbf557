"""The control plane under faults, on a real `tpgate serve`: the controller killed under load, an engine that stops
answering for a while, and a pool removed while a long stream runs on it.

The test joins the gateway's Ray cluster as a driver and changes the state through the same typed client the
admin API and the tuner use.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from gateway.control.client import ControlClient
from gateway.control.controller import CONTROLLER_NAME, NAMESPACE
from tests.conftest import serve_gateway
from tests.processes import engine_pids, wait_until

pytestmark = pytest.mark.integration

CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 4
engine:
  time_scale: 1
  health_check_period_s: 1
  stop_timeout_s: 5
pools:
  keep-tp1: {{tp: 1, replicas: 1}}
  going-tp1: {{tp: 1, replicas: 1}}
routes:
  interactive: {{keep-tp1: 0.5, going-tp1: 0.5}}
  batch: {{keep-tp1: 1.0}}
auth:
  admin_token_file: {token_file}
  ray_token_file: {ray_token_file}
state_file: {state_file}
"""
MODEL = "llama-3-8b"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    import ray

    with serve_gateway(tmp_path_factory.mktemp("control-plane"), CONFIG) as running:
        port = running.ray_address().rsplit(":", 1)[1]  # the token: tests/conftest.py's, set for the session
        ray.init(address=f"127.0.0.1:{port}", namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        try:
            yield running
        finally:
            ray.shutdown()


@pytest.fixture
def client(gateway):
    return ControlClient(name=CONTROLLER_NAME, namespace=NAMESPACE, timeout_s=15)


def chat(gateway, *, route="interactive", max_tokens=8, stream=False, timeout_s=60.0):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}
    headers = {"content-type": "application/json", "x-workload-class": route}
    if route.startswith("trial-"):  # only the admin token reaches trial routes
        headers["authorization"] = f"Bearer {gateway.admin_token}"
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        return resp.status, resp.read()


class Load:
    """Requests back to back from a few threads until stopped; every outcome is kept."""

    def __init__(self, gateway, *, threads=2, route="interactive"):
        self.outcomes = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(gateway, route)) for _ in range(threads)]

    def _run(self, gateway, route):
        while not self._stop.is_set():
            try:
                status, _ = chat(gateway, route=route)
                self.outcomes.append(status)
            except Exception as exc:  # an HTTPError or a dropped connection: a failed request
                self.outcomes.append(repr(exc))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def endpoints(gateway, pool_id):
    return gateway.status()["pools"][pool_id]["endpoints"]


async def test_killing_the_controller_under_load_loses_no_request_and_changes_resume(gateway, client):
    import ray

    before = await client.describe()
    with Load(gateway) as load:
        time.sleep(2)
        ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=False)  # Ray restarts it
        time.sleep(1)
        served_while_down = len(load.outcomes)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                after = await client.describe()
                if after["epoch"] != before["epoch"]:
                    break
            except Exception:  # ControllerUnavailable while it restarts
                pass
            await asyncio.sleep(0.5)
        else:
            pytest.fail("the controller did not come back")
        time.sleep(2)
    # it reloaded its stored pools and routes (versions restart under the new epoch: endpoint changes, which bump
    # the version, are not stored but registered again by the replicas)
    assert after["restored"] and (after["pools"], after["routes"]) == (before["pools"], before["routes"])
    assert load.outcomes and set(load.outcomes) == {200}, [o for o in load.outcomes if o != 200][:5]
    assert len(load.outcomes) > served_while_down  # requests kept flowing on the routers' last table
    # changes resume: a new pool and a trial route to it serve requests
    await client.add_pool(await _spec_like(client, "keep-tp1", "extra-tp1"))
    await client.wait_ready("extra-tp1", timeout_s=120)
    await client.set_route("trial-after-restart", {"extra-tp1": 1.0}, trial_class="interactive")
    wait_until(lambda: _serves(gateway, "trial-after-restart"), timeout_s=20, what="the router to take the change")
    await client.remove_route("trial-after-restart")
    await client.remove_pool("extra-tp1")


async def test_an_engine_that_stops_answering_for_a_while_returns_to_routing_by_itself(gateway):
    (replica, url), = endpoints(gateway, "keep-tp1").items()
    port = int(url.rsplit(":", 1)[1])
    (pid,) = engine_pids({port})
    os.kill(pid, signal.SIGSTOP)  # a frozen engine: misses its probes and health checks
    try:
        wait_until(lambda: replica not in endpoints(gateway, "keep-tp1"), timeout_s=15,
                   what="the frozen engine to leave routing")
        time.sleep(2)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: endpoints(gateway, "keep-tp1") == {replica: url}, timeout_s=20,
               what="the same replica and engine to return to routing")
    assert chat(gateway, route="batch")[0] == 200
    kinds = [(e["kind"], e["pool"]) for e in gateway.status()["events"]]
    assert ("replica.gone", "keep-tp1") in kinds and ("replica.ready", "keep-tp1") in kinds


async def test_a_long_stream_on_a_pool_being_removed_finishes_intact(gateway, client):
    await client.set_route("trial-drain", {"going-tp1": 1.0}, trial_class="interactive")
    wait_until(lambda: _serves(gateway, "trial-drain"), timeout_s=20, what="the trial route")
    result = {}

    def stream():
        status, body = chat(gateway, route="trial-drain", max_tokens=1200, stream=True, timeout_s=120)
        result["status"], result["events"] = status, [e for e in body.split(b"\n\n") if e.strip()]

    streaming = threading.Thread(target=stream)
    streaming.start()
    time.sleep(1.5)  # tokens are flowing
    await client.remove_pool("going-tp1")
    assert "going-tp1" in gateway.status()["draining"]
    streaming.join(timeout=120)
    assert result["status"] == 200 and result["events"][-1] == b"data: [DONE]"
    assert not any(b'"error"' in e for e in result["events"])
    content = [json.loads(e[6:]) for e in result["events"][:-1]]
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    wait_until(lambda: "going-tp1" not in gateway.status()["draining"], timeout_s=90,
               what="the pool to be drained and deleted")
    events = [(e["kind"], e["pool"]) for e in gateway.status()["events"]]
    assert ("drain.finished", "going-tp1") in events and ("drain.deadline", "going-tp1") not in events


async def _spec_like(client, source_id, new_id):
    import dataclasses

    from gateway.control.state import pool_from_dict

    pool = pool_from_dict((await client.raw_status())["pools"][source_id])
    return dataclasses.replace(pool, id=new_id)


def _serves(gateway, route):
    try:
        return chat(gateway, route=route)[0] == 200
    except Exception:
        return False
