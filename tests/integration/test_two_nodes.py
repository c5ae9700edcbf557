"""tpgate on a two-node Ray cluster (two loopback addresses of this machine, 4 simulated GPUs each): engines listen
on their node's address behind their pool's key, TP stays inside a node, two TP-4 replicas on different nodes
serve, and losing a node leaves the other serving while the state shows the lost capacity.

The cluster is ``tests/integration/two_node_cluster.py`` in a process of its own (this test session's driver is
already connected to the session's cluster); ``tpgate serve`` joins it (``ray_address``)."""

import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.conftest import serve_gateway
from tests.integration import two_node_cluster
from tests.processes import wait_until

pytestmark = pytest.mark.integration

CLUSTER_START_TIMEOUT_S = 120
CONFIG = """
model: llama-3-8b
gpu: a100-80gb
gpus: 8
gpus_per_node: 4
ray_address: {ray_address}
engine:
  kind: sim
  host: auto
  time_scale: 10
server:
  fast_path: standard
pools:
  wide:
    tp: 4
    replicas: 2
routes:
  interactive:
    wide: 1.0
  batch:
    wide: 1.0
state_file: {{state_file}}
auth:
  admin_token_file: {{token_file}}
  ray_token_file: {{ray_token_file}}
  engine_key_file: {engine_key_file}
"""


@contextlib.contextmanager
def two_node_ray_cluster():
    process = subprocess.Popen([sys.executable, two_node_cluster.__file__], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        line = _read_line(process, CLUSTER_START_TIMEOUT_S)
        yield json.loads(line)["address"], process
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            process.stdin.write("stop\n")
            process.stdin.flush()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            for pipe in (process.stdin, process.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()


def _read_line(process, timeout_s):
    result = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result or not result[0]:
        raise AssertionError(f"the two-node cluster did not start within {timeout_s} s (exit {process.poll()})")
    return result[0]


def call(url, *, token=None, method="GET", body=None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Load:
    """Non-streamed chat requests, one after another from two threads, until stopped; every outcome counted."""

    def __init__(self, base_url):
        self._client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
        self.outcomes = Counter()
        self.failures = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._client.close()

    def _run(self):
        while not self._stop.is_set():
            try:
                reply = self._client.chat.completions.create(
                    model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
                self.outcomes["succeeded" if reply.choices[0].message.content else "empty"] += 1
            except openai.APIError as exc:
                self.outcomes["failed"] += 1
                self.failures.append(repr(exc))


def test_two_tp4_replicas_serve_from_two_nodes_behind_pool_keys_and_one_node_lost_leaves_the_other(tmp_path):
    with two_node_ray_cluster() as (ray_address, cluster):
        config = CONFIG.format(ray_address=ray_address, engine_key_file=tmp_path / "engine-key")
        with serve_gateway(tmp_path, config) as gateway:
            state_url, token = gateway.url + "/admin/state", gateway.admin_token
            endpoints = call(state_url, token=token)[1]["pools"]["wide"]["endpoints"]
            hosts = {url.split("//")[1].rsplit(":", 1)[0] for url in endpoints.values()}
            assert hosts == {two_node_cluster.HEAD_ADDRESS, two_node_cluster.WORKER_ADDRESS}, endpoints

            # TP stays inside a node: 8 GPUs in all, 4 per node
            status, refusal = call(gateway.url + "/admin/pools", token=token, method="POST",
                                   body={"id": "huge", "tp": 8})
            assert status == 400 and "exceeds the 4 GPUs per node" in refusal["error"]["message"], refusal

            # an engine on the other node answers only with its pool's key, which only the routers hold
            worker_engine = next(url for url in endpoints.values() if two_node_cluster.WORKER_ADDRESS in url)
            seed = Path(tmp_path / "engine-key").read_text().strip()
            key = hmac.new(seed.encode(), b"tpgate-engine:wide", hashlib.sha256).hexdigest()
            assert call(worker_engine + "/v1/models")[0] == 401
            assert call(worker_engine + "/v1/models", token=gateway.admin_token)[0] == 401
            assert call(worker_engine + "/v1/models", token=key)[0] == 200
            assert call(worker_engine + "/health")[0] == 200
            assert key not in gateway.log_path.read_text() and key not in gateway.metrics()

            with Load(gateway.url) as before:
                wait_until(lambda: before.outcomes["succeeded"] >= 10, timeout_s=60, what="ten requests served")
            served_by = Counter(_served_by(gateway.metrics()))
            assert set(served_by) == set(endpoints), served_by  # both nodes' replicas served

            with Load(gateway.url) as during:
                wait_until(lambda: during.outcomes["succeeded"] >= 5, timeout_s=60, what="load before the loss")
                cluster.stdin.write("remove-worker\n")
                cluster.stdin.flush()
                assert _read_line(cluster, 60).strip() == "removed"
                lost_at = time.monotonic()

                def capacity_shows_lost():
                    pool = call(state_url, token=token)[1]["pools"]["wide"]
                    return pool["ready_replicas"] == 1 and pool["replicas"] == 2

                wait_until(capacity_shows_lost, timeout_s=60, what="the state to show one replica of two")
                seen_after = during.outcomes["succeeded"]
                wait_until(lambda: during.outcomes["succeeded"] >= seen_after + 10, timeout_s=60,
                           what="ten more requests served after the loss")
            pool = call(state_url, token=token)[1]["pools"]["wide"]
            print(f"two nodes: before the loss {dict(before.outcomes)}; during and after it {dict(during.outcomes)}"
                  f" (the state showed 1/2 replicas {time.monotonic() - lost_at:.1f} s after); failures "
                  f"{during.failures[:3]}")
            assert list(pool["endpoints"].values()) == [u for u in endpoints.values() if u != worker_engine]
            assert before.outcomes["failed"] == during.outcomes["failed"] == 0, during.failures


def _served_by(metrics_text):
    """Replica ids that have served a request (the in-flight gauge has a series per replica that served)."""
    for line in metrics_text.splitlines():
        if line.startswith("tpgate_inflight_requests{"):
            yield line.split('replica="')[1].split('"')[0]
