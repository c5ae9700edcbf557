"""Starting and stopping a real `tpgate serve` as a new user does: from a script, in the background.

The gateway runs as a background job of a non-interactive shell, which starts it with SIGINT ignored; SIGINT must
stop it all the same. Its terminal output must be tpgate's own lines (Ray's go to the log file the banner names),
a second `tpgate serve` on its port must stop at once with one line, Serve's access log must name the path, and a
stop must drain: new requests refused, the stream in flight going on, a second SIGINT ending it with an error event
and [DONE]. The stopping tests end their gateway: keep them last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RAY_TOKEN_FILE, Gateway
from tests.processes import alive, engine_pids, free_port, wait_until

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 240.0
MODEL = "llama-3-8b"
CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 1
engine: {{time_scale: 1, health_check_period_s: 1, stop_timeout_s: 5}}
pools:
  only: {{tp: 1, replicas: 1}}
routes:
  interactive: {{only: 1.0}}
  batch: {{only: 1.0}}
auth: {{admin_token_file: {token_file}, ray_token_file: {ray_token_file}}}
state_file: {state_file}
router: {{serve_access_log: true}}  # off by default (CPU per request); the access-log test turns it on
"""


@contextlib.contextmanager
def background_serve(workdir: Path) -> Iterator[tuple[Gateway, int, Path]]:
    """`tpgate serve` started as `cmd &` by `bash -c` (so with SIGINT ignored), ready; yields the gateway, the
    serve process's pid and its config. Stopped with SIGTERM (twice) at the end if a test left it running."""
    config = workdir / "tpgate.yaml"
    config.write_text(CONFIG.format(token_file=workdir / "admin-token", state_file=workdir / "state.json",
                                    ray_token_file=RAY_TOKEN_FILE))
    port = free_port()
    log_path = workdir / "serve.log"
    command = (f"{sys.executable} -m gateway.cli serve --config {config} --port {port} > {log_path} 2>&1 & "
               "echo $!; wait")
    # Serve's replica log records are buffered (1,000 at a time) on the router: the access-log test wants each one
    # written at once, which the operator's own setting of the variable allows
    env = {**os.environ, "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}
    shell = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, text=True, start_new_session=True,
                             env=env)
    assert shell.stdout is not None
    with shell.stdout:
        pid = int(shell.stdout.readline())
    gateway = Gateway(f"http://127.0.0.1:{port}", "", shell, log_path)
    try:
        wait_until(lambda: is_ready(log_path) or shell.poll() is not None, timeout_s=READY_TIMEOUT_S,
                   what="tpgate serve to be ready")
        assert shell.poll() is None, f"tpgate serve exited:\n{log_path.read_text()[-3000:]}"
        gateway.admin_token = (workdir / "admin-token").read_text().strip()
        yield gateway, pid, config
    finally:
        for _ in range(2):
            if shell.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    shell.wait(timeout=60)
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)


def is_ready(log_path: Path) -> bool:
    return log_path.exists() and re.search(r"^tpgate: ready$", log_path.read_text(), re.MULTILINE) is not None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with background_serve(tmp_path_factory.mktemp("lifecycle")) as running:
        yield running


def logs_dir(gateway: Gateway) -> Path:
    match = re.search(r"^  logs: (\S+) ", gateway.log_path.read_text(), re.MULTILINE)
    assert match, "no 'logs:' line in the banner"
    return Path(match.group(1))


def request(gateway: Gateway, path: str, body: dict | None = None, timeout_s: float = 30) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(gateway.url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def chat(max_tokens: int = 4, stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}


def not_tpgate_lines(text: str) -> list[str]:
    """Terminal lines that are neither tpgate's own (``tpgate: ...``) nor its banner's (indented)."""
    return [line for line in text.splitlines() if line and not line.startswith(("tpgate: ", "  "))]


def test_a_fresh_start_prints_only_tpgate_lines_and_ray_s_go_to_the_log_it_names(served):
    gateway, _, _ = served
    output = gateway.log_path.read_text()
    assert not_tpgate_lines(output) == []
    assert "Connecting to existing Serve app" not in output
    driver_log = next(logs_dir(gateway).glob("tpgate-*.log"))
    assert "Started Serve" in driver_log.read_text()
    assert f"readiness: {gateway.url}/health answers 200" in output


def test_a_second_serve_on_the_same_port_stops_at_once_with_one_line(served):
    gateway, _, config = served
    port = gateway.url.rsplit(":", 1)[1]
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", port],
                            capture_output=True, text=True, timeout=60)
    took_s = time.monotonic() - started
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"tpgate: error: port {port} on 127.0.0.1 (server.port, --port) is already in use: another tpgate serve or "
        "another server listens there; stop it or choose another port"]
    assert took_s < 15, f"took {took_s:.1f} s: the port must be checked before Ray starts"
    assert request(gateway, "/health")[0] == 200  # the first one is unharmed


def test_serve_s_access_log_names_the_path_of_each_request(served):
    gateway, _, _ = served
    assert request(gateway, "/v1/chat/completions", chat())[0] == 200
    assert request(gateway, "/v1/models")[0] == 200
    serve_logs = logs_dir(gateway) / "serve"

    def logged() -> str:
        return "".join(p.read_text() for p in serve_logs.glob("replica_tpgate_router_*.log"))

    wait_until(lambda: "POST /v1/chat/completions 200" in logged() and "GET /v1/models 200" in logged(),
               timeout_s=15, what="the router's access log to name the paths")
    assert not re.search(r" -- (POST|GET) / \d{3} ", logged())


def test_sigint_drains_and_a_second_sigint_ends_the_stream_with_an_error_event_and_done(served):
    gateway, pid, _ = served
    engines = engine_pids(gateway.engine_ports())
    assert engines
    events: list[bytes] = []

    def stream() -> None:
        req = urllib.request.Request(gateway.url + "/v1/chat/completions", data=json.dumps(
            chat(max_tokens=20000, stream=True)).encode(), headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            events.extend(line.strip() for line in resp if line.strip())

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: len(events) > 5, timeout_s=30, what="the stream to start")
    os.kill(pid, signal.SIGINT)  # SIGINT was ignored when the shell started it: tpgate handles it anyway
    wait_until(lambda: "1 request in flight; new requests get 503" in gateway.log_path.read_text(), timeout_s=30,
               what="the drain to say what it waits for")
    status, body = request(gateway, "/v1/chat/completions", chat())
    assert (status, json.loads(body)["error"]["code"]) == (503, "stopping")
    assert request(gateway, "/health")[0] == 503
    seen = len(events)
    time.sleep(1.0)
    assert len(events) > seen, "the stream in flight must go on while the gateway drains"
    assert reader.is_alive()

    os.kill(pid, signal.SIGINT)
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert json.loads(events[-2].removeprefix(b"data: "))["error"]["code"] == "stopping"
    assert events[-1] == b"data: [DONE]"
    assert gateway.process.wait(timeout=60) == 0  # the shell's `wait` returns the serve process's status
    output = gateway.log_path.read_text()
    assert "tpgate: stopping: ending 1 request in flight" in output
    assert re.search(r"^tpgate: stopped in [\d.]+ s$", output, re.MULTILINE)
    assert not_tpgate_lines(output) == []  # no Ray line on the way out either
    wait_until(lambda: not any(alive(p) for p in engines), timeout_s=20, what="the engines to stop")


def test_a_stop_with_nothing_in_flight_takes_seconds(tmp_path):
    with background_serve(tmp_path) as (gateway, pid, _):
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        assert gateway.process.wait(timeout=120) == 0
        took_s = time.monotonic() - started
    output = gateway.log_path.read_text()
    assert "in flight" not in output  # nothing to wait for, nothing said about it
    assert "tpgate: stopping: removing 1 pool and the router" in output
    assert took_s < 12, f"a stop with nothing in flight took {took_s:.1f} s"
