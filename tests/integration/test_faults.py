"""Faults under load on a real `tpgate serve` with two engine replicas and two router replicas: an engine process
killed, a pool replica killed, a router replica killed, a pool saturated. Each test drives streaming load from a
few clients, reports what it sent, what succeeded, what the routers retried and what failed and why, and checks:

- no request that had not started streaming is lost to an engine or pool replica that dies;
- a stream an engine took with it ends with an SSE error event and ``[DONE]``;
- the capacity comes back (Serve replaces the replica, the router sends to it again);
- a saturated pool answers 429 with ``Retry-After`` at once, the routers' memory stays bounded, and the pool serves
  again as soon as the load drops.

The controller killed under load is in ``test_control_plane.py``; the tuner killed mid-trial, and resumed, in
``test_tune.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import serve_gateway
from tests.processes import engine_pids, parent_pid, wait_until

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
POOL = "steady-tp1"
PER_REPLICA = 4  # router.max_inflight_per_replica
CONFIG = f"""
model: llama-3-8b
gpu: h100-80gb
gpus: 4
engine:
  time_scale: 10
  health_check_period_s: 1
  stop_timeout_s: 5
pools:
  {POOL}: {{{{tp: 1, replicas: 2}}}}
routes:
  interactive: {{{{{POOL}: 1.0}}}}
  batch: {{{{{POOL}: 1.0}}}}
router:
  replicas: 2
  max_inflight_per_replica: {PER_REPLICA}
  queue_timeout_s: 0.2
auth:
  admin_token_file: {{token_file}}
  ray_token_file: {{ray_token_file}}
state_file: {{state_file}}
"""
ROUTER = "ray::ServeReplica:tpgate:router"
POOL_REPLICA = f"ray::ServeReplica:pool-{POOL}:engine"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with serve_gateway(tmp_path_factory.mktemp("faults"), CONFIG) as running:
        yield running


@dataclass
class Tally:
    """Outcomes of the requests one load run sent."""

    outcomes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    def report(self, what: str, retried: float) -> str:
        failed = {k: v for k, v in self.outcomes.items() if k != "ok"}
        return (f"{what}: sent {self.sent}, succeeded {self.outcomes['ok']}, retried {retried:g}, "
                f"failed {sum(failed.values())} {dict(failed)}")


@contextlib.contextmanager
def post(url: str, body: dict, *, timeout_s: float = 60.0) -> Iterator[http.client.HTTPResponse]:
    """POST ``body`` as JSON on a new connection, closed at the end of the block; the response, body unread."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"content-type": "application/json"})
        yield connection.getresponse()
    finally:
        connection.close()


def stream_once(url: str, max_tokens: int) -> str:
    """One streamed chat request; its outcome: ``ok``, ``error event`` (the stream ended with an error event and
    [DONE]), ``cut after N events`` (the connection closed without [DONE]), ``status N`` (an error answer before
    any event), or ``connection: <error>`` (no answer at all)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    events: list[bytes] = []
    try:
        with post(url, body) as resp:
            if resp.status != 200:
                resp.read()
                return f"status {resp.status}"
            for line in resp:
                if line.startswith(b"data: "):
                    events.append(line.strip())
    except (OSError, http.client.HTTPException) as exc:
        return f"cut after {len(events)} events" if events else f"connection: {type(exc).__name__}"
    if not events or events[-1] != b"data: [DONE]":
        return f"cut after {len(events)} events"
    if any(b'"error"' in e for e in events):
        return "error event"
    return "ok"


class Load:
    """``clients`` threads streaming back to back until stopped."""

    def __init__(self, gateway, *, clients: int = 4, max_tokens: int = 48) -> None:
        self.tally = Tally()
        self._url = gateway.url
        self._stop = threading.Event()
        self._max_tokens = max_tokens
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tally.add(stream_once(self._url, self._max_tokens))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def tree(gateway, name: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(gateway.process.pid).children(recursive=True):
        try:
            if process.cmdline()[:1] == [name]:
                found.append(process)
        except psutil.Error:
            continue
    return found


def router_ports(gateway) -> list[int]:
    """The router replicas' own HTTP ports (HAProxy's backend servers), to read each router's metrics."""
    haproxy = next(p for p in psutil.Process(gateway.process.pid).children(recursive=True) if p.name() == "haproxy")
    argv = haproxy.cmdline()
    lines = Path(argv[argv.index("-f") + 1]).read_text().splitlines()
    return [int(line.split()[2].rsplit(":", 1)[1]) for line in lines
            if line.split()[:1] == ["server"] and "SERVE_REPLICA_tpgate-router" in line]


def retries_total(gateway) -> float:
    """tpgate_upstream_retries_total summed over every live router replica."""
    total = 0.0
    for port in router_ports(gateway):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        total += sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "tpgate_upstream_retries_total")
    return total


def endpoints(gateway) -> dict[str, str]:
    return gateway.status()["pools"][POOL]["endpoints"]


def whole_again(gateway) -> bool:
    return gateway.all_ready() and len(endpoints(gateway)) == 2 and len(tree(gateway, ROUTER)) == 2


def run_with_fault(gateway, fault, *, settle_s: float = 4.0, max_tokens: int = 48) -> tuple[Tally, float]:
    """Load before, during and after ``fault``; the outcomes, and the retries the routers counted meanwhile (a
    router that was killed takes its count with it: never below 0)."""
    wait_until(lambda: whole_again(gateway), timeout_s=120, what="the gateway to be whole before the fault")
    retried_before = retries_total(gateway)
    with Load(gateway, max_tokens=max_tokens) as load:
        time.sleep(2.0)
        fault()
        time.sleep(settle_s)
    return load.tally, max(0.0, retries_total(gateway) - retried_before)


def assert_nothing_lost_before_streaming(tally: Tally) -> None:
    lost = {k: v for k, v in tally.outcomes.items() if k.startswith(("status", "connection", "cut"))}
    assert lost == {}, f"requests lost: {dict(tally.outcomes)}"
    assert tally.outcomes["ok"] > 10


def test_an_engine_killed_under_load(gateway):
    port = int(next(iter(endpoints(gateway).values())).rsplit(":", 1)[1])
    (victim,) = engine_pids({port})
    tally, retried = run_with_fault(gateway, lambda: os.kill(victim, signal.SIGKILL))
    print(tally.report("engine killed", retried))
    assert_nothing_lost_before_streaming(tally)  # the streams it held end with an error event; nothing else fails
    wait_until(lambda: whole_again(gateway) and victim not in engine_pids(), timeout_s=120,
               what="a new engine to replace the killed one")
    assert Counter(stream_once(gateway.url, 8) for _ in range(6)) == {"ok": 6}


def test_a_pool_replica_killed_under_load(gateway):
    port = int(next(iter(endpoints(gateway).values())).rsplit(":", 1)[1])
    (engine,) = engine_pids({port})
    replica = parent_pid(engine)
    assert replica is not None and POOL_REPLICA in " ".join(psutil.Process(replica).cmdline())
    tally, retried = run_with_fault(gateway, lambda: os.kill(replica, signal.SIGKILL))
    print(tally.report("pool replica killed", retried))
    assert_nothing_lost_before_streaming(tally)
    wait_until(lambda: whole_again(gateway) and not psutil.pid_exists(engine), timeout_s=120,
               what="Serve to replace the pool replica, its engine gone")


def test_a_router_replica_killed_under_load(gateway):
    victim = tree(gateway, ROUTER)[0]
    # longer streams, so that the router dies with some of them in flight
    tally, retried = run_with_fault(gateway, lambda: victim.send_signal(signal.SIGKILL), max_tokens=400)
    print(tally.report("router replica killed", retried))
    # what the killed router held is lost with it (it cannot send an error event); nothing else is, and the load
    # goes on through the other router
    lost = {k: v for k, v in tally.outcomes.items() if k not in ("ok", "error event")}
    assert sum(lost.values()) <= 4, f"more requests lost than the clients had in flight: {dict(tally.outcomes)}"
    assert tally.outcomes["ok"] > 10
    wait_until(lambda: whole_again(gateway) and victim.pid not in {p.pid for p in tree(gateway, ROUTER)},
               timeout_s=120, what="Serve to replace the router replica")
    assert Counter(stream_once(gateway.url, 8) for _ in range(6)) == {"ok": 6}


def test_a_saturated_pool_answers_429_with_retry_after_keeps_memory_bounded_and_recovers(gateway):
    wait_until(lambda: whole_again(gateway), timeout_s=120, what="the gateway to be whole")
    routers = tree(gateway, ROUTER)
    capacity = 2 * PER_REPLICA  # in flight per router replica: each router has its own gates
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2000, "ignore_eos": True}

    def one(_: int) -> tuple[int, str | None, float]:
        started = time.monotonic()
        with post(gateway.url, body, timeout_s=120) as resp:
            resp.read()
            return resp.status, resp.getheader("retry-after"), time.monotonic() - started

    def burst(n: int) -> list[tuple[int, str | None, float]]:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    burst(8)  # warm up connections and code paths before measuring memory
    rss_before = sum(p.memory_info().rss for p in routers)
    results = []
    for _ in range(3):
        results += burst(48)
    rss_after = sum(p.memory_info().rss for p in routers)
    statuses = Counter(status for status, _, _ in results)
    rejected = [(retry, took) for status, retry, took in results if status == 429]
    print(f"saturation: sent {len(results)}, succeeded {statuses[200]}, rejected 429 {statuses[429]}, "
          f"other {dict((s, c) for s, c in statuses.items() if s not in (200, 429))}; router RSS "
          f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert set(statuses) <= {200, 429}
    assert statuses[429] >= len(results) - 3 * capacity * len(routers)
    assert statuses[200] >= capacity
    assert all(retry == "1" for retry, _ in rejected)
    assert max(took for _, took in rejected) < 5.0  # refused after the 0.2 s queue wait, not after the work
    assert rss_after - rss_before < 64 * 2**20
    assert Counter(stream_once(gateway.url, 8) for _ in range(6)) == {"ok": 6}  # the load dropped: served again
