"""The HAProxy fast path (`server.fast_path: haproxy`) of a real `tpgate serve` with two router replicas and the
router's Serve settings (user code on the replica's loop, buffered logs, no access log, HAProxy marking requests
so that Serve skips its own disconnect watcher): requests and streams pass through it, a client that goes away
aborts its engine request, time spent in front of the router counts in the gateway's TTFT, a Prometheus reading
the gateway's target files scrapes both replicas and sums them right, every listener HAProxy opens and every
Serve HTTP port it forwards to is on loopback, its admin socket is private, and no HAProxy outlives the Ray
actor that started it or the gateway.

Ray's own RPC ports (GCS, raylet, workers, agents) listen on all interfaces in both modes and are protected by
Ray's token authentication; they are not HAProxy's and not asserted on here (see docs/benchmarks.md).
The last two tests disturb the gateway and stop it: keep them last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from gateway.dataplane.metrics_targets import TARGET_FILE_GLOB, read_targets
from tests.processes import free_port, wait_until

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 240.0
# the engine decodes a token in ~7.6 ms / TIME_SCALE: slow enough that a long request is still running when its
# client goes away
TIME_SCALE = 2
LONG_MAX_TOKENS = 4000  # ~15 s at TIME_SCALE
ABORT_WITHIN_S = 5.0
CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 1
engine: {{time_scale: {time_scale}, health_check_period_s: 1, stop_timeout_s: 5}}
server: {{fast_path: haproxy}}
router: {{replicas: 2, metrics_targets_dir: {targets_dir}}}
pools:
  only: {{tp: 1, replicas: 1}}
routes:
  interactive: {{only: 1.0}}
  batch: {{only: 1.0}}
auth: {{admin_token_file: {token_file}}}
state_file: {state_file}
"""


@dataclass
class FastPathGateway:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    workdir: Path

    @property
    def targets_dir(self) -> Path:
        return self.workdir / "targets"

    def engine_url(self) -> str:
        token = (self.workdir / "admin-token").read_text().strip()
        request = urllib.request.Request(self.url + "/admin/status", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            [url] = [u for pool in json.loads(resp.read())["pools"].values() for u in pool["endpoints"].values()]
        return str(url)

    def routers(self) -> list[psutil.Process]:
        return [p for p in self.tree() if " ".join(p.cmdline()).startswith("ray::ServeReplica:tpgate:router")]

    def tree(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.process.pid).children(recursive=True)
        return []

    def haproxies(self) -> list[psutil.Process]:
        return [p for p in self.tree() if _name(p) == "haproxy"]

    def haproxy_config(self) -> Path:
        argv = self.haproxies()[0].cmdline()
        return Path(argv[argv.index("-f") + 1])


def _name(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return process.name()
    return ""


def _alive(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # so that SIGINT stops it even if ours is ignored


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fast-path")
    config = workdir / "tpgate.yaml"
    config.write_text(CONFIG.format(token_file=workdir / "admin-token", state_file=workdir / "state.json",
                                    time_scale=TIME_SCALE, targets_dir=workdir / "targets"))
    port = free_port()
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint,
        )
    gateway = FastPathGateway(f"http://127.0.0.1:{port}", port, process, log_path, workdir)
    try:
        wait_until(lambda: "tpgate: ready" in log_path.read_text() or process.poll() is not None,
                   timeout_s=READY_TIMEOUT_S, what="tpgate serve (fast path) to be ready")
        assert process.poll() is None, f"tpgate serve exited:\n{log_path.read_text()[-3000:]}"
        wait_until(lambda: bool(gateway.haproxies()), timeout_s=30, what="HAProxy to run")
        wait_until(lambda: len(read_targets(gateway.targets_dir)) == 2, timeout_s=30,
                   what="both router replicas to list their metrics targets")
        yield gateway
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise


def _post(url: str, payload: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.status, resp.read()


def _listeners(*, pids: set[int] | None = None, ports: set[int] | None = None) -> list[tuple[int, str, int]]:
    """(pid, address, port) of listening TCP sockets, by owner or by port."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN:
            continue
        if (pids is None or conn.pid in pids) and (ports is None or conn.laddr.port in ports):
            found.append((conn.pid, conn.laddr.ip, conn.laddr.port))
    return found


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def _config_lines(gateway: FastPathGateway, keyword: str) -> list[list[str]]:
    lines = gateway.haproxy_config().read_text().splitlines()
    return [line.split() for line in lines if line.split()[:1] == [keyword]]


def _host_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not _is_loopback(a.address)]


def test_requests_and_streams_pass_through_the_fast_path(gateway):
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, data = _post(gateway.url + "/v1/chat/completions", body)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 4

    status, data = _post(gateway.url + "/v1/chat/completions", {**body, "stream": True, "ignore_eos": True})
    events = [line for line in data.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and len(events) == 5 and events[-1] == "data: [DONE]"
    assert gateway.haproxies(), "the gateway should be serving through HAProxy"


def test_every_haproxy_listener_is_on_loopback(gateway):
    pids = {p.pid for p in gateway.haproxies()}
    listeners = _listeners(pids=pids)
    ports = {port for _, _, port in listeners}
    assert gateway.port in ports and len(ports) >= 3, listeners  # front, stats, Prometheus exporter
    assert [entry for entry in listeners if not _is_loopback(entry[1])] == []


def test_the_serve_http_ports_haproxy_forwards_to_are_on_loopback(gateway):
    # `server NAME HOST:PORT ...`: the router replica's direct-ingress port and Serve's fallback proxy
    servers = {int(words[2].rsplit(":", 1)[1]) for words in _config_lines(gateway, "server")}
    assert len(servers) >= 2, servers
    listeners = _listeners(ports=servers)
    assert {port for _, _, port in listeners} == servers, listeners
    assert [entry for entry in listeners if not _is_loopback(entry[1])] == []


def test_stats_and_metrics_answer_on_loopback_and_nowhere_else(gateway):
    ports = {int(words[1].rsplit(":", 1)[1]) for words in _config_lines(gateway, "bind")} - {gateway.port}
    assert len(ports) == 2, ports  # the stats page and the Prometheus exporter
    for port in ports:
        assert {_status(f"http://127.0.0.1:{port}{path}") for path in ("/stats", "/metrics")} & {200}, port
        for address in _host_addresses():
            with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), timeout=5):
                pass


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_the_admin_socket_is_private(gateway):
    [words] = [w for w in _config_lines(gateway, "stats") if w[1] == "socket"]
    admin_socket = Path(words[2])
    assert stat.S_ISSOCK(admin_socket.stat().st_mode)
    assert stat.S_IMODE(admin_socket.stat().st_mode) == 0o600
    runtime_dir = gateway.haproxy_config().parent.parent  # DIR/<node id>/haproxy.cfg
    assert admin_socket.is_relative_to(runtime_dir)
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700 and runtime_dir.stat().st_uid == os.getuid()


def _engine_gauge(gateway: FastPathGateway, name: str) -> float:
    with urllib.request.urlopen(gateway.engine_url() + "/metrics", timeout=10) as resp:
        return _sum_of(resp.read().decode(), name)


def _sum_of(exposition: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def _raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def _serve_proxy_port(gateway: FastPathGateway) -> int:
    """Serve's own HTTP proxy, HAProxy's backup server: the path of `server.fast_path: standard`."""
    [words] = [w for w in _config_lines(gateway, "server") if w[-1] == "backup"]
    return int(words[2].rsplit(":", 1)[1])


@pytest.mark.parametrize("entry", ["front", "serve-proxy"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_goes_away_aborts_its_engine_request(gateway, stream, entry):
    """Through the front, Serve's own disconnect watcher is skipped (HAProxy marks every request): the router's
    watch on the same ASGI receive must still cancel the engine request. Through Serve's proxy (the standard
    mode's path, unmarked) the proxy's cancellation must reach the router running on the replica's loop."""
    marked = ["http-request", "set-header", "x-request-disconnect-disabled", "?1"]
    # Ray rewrites the file before each HAProxy reload and the guard adds the rules as HAProxy starts: between
    # the two the file on disk is Ray's own, so wait for the version HAProxy runs with
    wait_until(lambda: marked in _config_lines(gateway, "http-request"), timeout_s=20,
               what="HAProxy's configuration to carry the disconnect mark")
    port = gateway.port if entry == "front" else _serve_proxy_port(gateway)
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True, "stream": stream}
    sock = _raw_request(port, body)
    try:
        if stream:
            received = b""
            sock.settimeout(10)
            while b"data: " not in received:  # the stream started (the headers may come in a packet of their own)
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed before the first event: {received!r}"
                received += chunk
        wait_until(lambda: _engine_gauge(gateway, "lmdeploy:num_requests_running") == 1, timeout_s=10,
                   what="the request to run in the engine")
    finally:
        sock.close()
    closed_at = time.monotonic()
    wait_until(lambda: _engine_gauge(gateway, "lmdeploy:num_requests_running") == 0, timeout_s=ABORT_WITHIN_S,
               what="the engine to drop the request of a client that went away")
    assert time.monotonic() - closed_at < ABORT_WITHIN_S  # well before the ~15 s it would have run


def _router_metrics(gateway: FastPathGateway) -> list[str]:
    texts = []
    for target in read_targets(gateway.targets_dir):
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as resp:
            texts.append(resp.read().decode())
    return texts


def test_time_held_in_front_of_the_router_counts_in_the_gateways_ttft(gateway):
    """Both router replicas stopped for HOLD_S while a stream arrives: HAProxy has it, the router cannot start on
    it. The gateway's TTFT (from the front door) and its front-wait figure both include the hold."""
    hold_s, below_s = 1.5, "1.0"
    labels = {"class": "interactive", "pool": "only"}

    def late(texts: list[str], family: str, le: str) -> float:
        return sum(_sum_of(t, family + "_count", **labels) - _sum_of(t, family + "_bucket", le=le, **labels)
                   for t in texts)

    before = _router_metrics(gateway)
    routers = gateway.routers()
    assert len(routers) == 2
    for router in routers:
        router.suspend()
    try:
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "stream": True}
        sent = concurrent.futures.ThreadPoolExecutor(1).submit(_post, gateway.url + "/v1/chat/completions", body)
        time.sleep(hold_s)
    finally:
        for router in routers:
            router.resume()
    assert sent.result(timeout=30)[0] == 200
    after = _router_metrics(gateway)
    assert late(after, "tpgate_time_to_first_token_seconds", below_s) == late(
        before, "tpgate_time_to_first_token_seconds", below_s) + 1
    assert late(after, "tpgate_front_wait_seconds", below_s) == late(before, "tpgate_front_wait_seconds", below_s) + 1


def test_prometheus_scrapes_every_router_replica_from_the_target_files(gateway, tmp_path):
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(30):
        assert _post(gateway.url + "/v1/chat/completions", body)[0] == 200
    texts = _router_metrics(gateway)
    per_replica = [_sum_of(t, "tpgate_requests_total") for t in texts]
    assert len(per_replica) == 2 and all(n > 0 for n in per_replica), per_replica  # HAProxy spread them
    with prometheus_scraping(tmp_path, [str(gateway.targets_dir / TARGET_FILE_GLOB)]) as query:
        wait_until(lambda: query('count(up{job="tpgate"} == 1)') == 2, timeout_s=30,
                   what="Prometheus to scrape both router replicas")
        wait_until(lambda: query('sum(tpgate_requests_total{job="tpgate"})') == sum(per_replica), timeout_s=15,
                   what="Prometheus's sum over the replicas to match theirs")
        assert query('sum(tpgate_request_duration_seconds_count{job="tpgate"})') == sum(
            _sum_of(t, "tpgate_request_duration_seconds_count") for t in texts)


@contextlib.contextmanager
def prometheus_scraping(workdir: Path, file_patterns: list[str]) -> Iterator[Callable[[str], float | None]]:
    """A real Prometheus on a free loopback port scraping job ``tpgate`` every second from ``file_patterns``
    (file_sd); yields an instant-query function (the first result's value, None without one)."""
    binary = shutil.which("prometheus")
    assert binary, "no prometheus on PATH (Debian: apt-get install -y prometheus)"
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "tpgate", "file_sd_configs": [{"files": file_patterns,
                                                                        "refresh_interval": "1s"}]}]}))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                                f"--storage.tsdb.path={workdir / 'data'}", "--log.level=warn"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(expression: str) -> float | None:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                result = json.loads(resp.read())["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    try:
        yield query
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_haproxy_dies_with_the_actor_that_started_it(gateway):
    [manager] = [p for p in gateway.tree() if "HAProxyManager" in " ".join(p.cmdline())]
    old = gateway.haproxies()
    assert old and all(p.ppid() == manager.pid for p in old)
    manager.kill()
    wait_until(lambda: not any(_alive(p) for p in old),
               timeout_s=15, what="HAProxy to stop when its manager died")
    # Serve restarts the manager, which starts a new (guarded) HAProxy
    wait_until(lambda: bool(set(gateway.haproxies()) - set(old)), timeout_s=120, what="a new HAProxy")
    wait_until(lambda: _serves(gateway), timeout_s=60, what="the fast path to serve again")
    test_every_haproxy_listener_is_on_loopback(gateway)


def _serves(gateway: FastPathGateway) -> bool:
    try:
        with urllib.request.urlopen(gateway.url + "/v1/models", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_stopping_the_gateway_leaves_no_haproxy_and_removes_its_directory(gateway):
    runtime_dir = gateway.haproxy_config().parent.parent
    seen = set(gateway.haproxies())
    gateway.process.send_signal(signal.SIGINT)
    while gateway.process.poll() is None:  # HAProxy may reload while the apps are deleted
        seen |= set(gateway.haproxies())
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.process.wait(timeout=0.2)
    assert gateway.process.returncode == 0, gateway.log_path.read_text()[-3000:]
    wait_until(lambda: not any(_alive(p) for p in seen),
               timeout_s=20, what="every HAProxy to stop with the gateway")
    assert not runtime_dir.exists()
