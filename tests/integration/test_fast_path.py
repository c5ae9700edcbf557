"""The HAProxy fast path (`server.fast_path: haproxy`) of a real `tpgate serve`: requests and streams pass
through it, every listener HAProxy opens and every Serve HTTP port it forwards to is on loopback, its admin
socket is private, and no HAProxy outlives the Ray actor that started it or the gateway.

Ray's own RPC ports (GCS, raylet, workers, agents) listen on all interfaces in both modes and are protected by
Ray's token authentication; they are not HAProxy's and not asserted on here (see docs/benchmarks.md).
The last two tests disturb the gateway and stop it: keep them last.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.processes import free_port, wait_until

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 240.0
CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 1
engine: {{time_scale: 100, health_check_period_s: 1, stop_timeout_s: 5}}
server: {{fast_path: haproxy}}
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
    config.write_text(CONFIG.format(token_file=workdir / "admin-token", state_file=workdir / "state.json"))
    port = free_port()
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint,
        )
    gateway = FastPathGateway(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        wait_until(lambda: "tpgate: ready" in log_path.read_text() or process.poll() is not None,
                   timeout_s=READY_TIMEOUT_S, what="tpgate serve (fast path) to be ready")
        assert process.poll() is None, f"tpgate serve exited:\n{log_path.read_text()[-3000:]}"
        wait_until(lambda: bool(gateway.haproxies()), timeout_s=30, what="HAProxy to run")
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
