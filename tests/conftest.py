"""Session fixtures. `gateway`: a real `tpgate serve` (Ray, Serve, simulated engines), started at most once per
test session and shared by every test that asks for it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import alive, engine_pids, free_port, wait_until

# One Ray token for every gateway the tests start, set before anything imports Ray (it reads its
# authentication mode once): the test process then joins those clusters as a client, as an operator would.
RAY_TOKEN_FILE = Path(tempfile.mkdtemp(prefix="tpgate-tests-")) / "ray-token"
RAY_TOKEN_FILE.write_text(secrets.token_hex(32) + "\n")
RAY_TOKEN_FILE.chmod(0o600)
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(RAY_TOKEN_FILE)})

API_KEY = "sk-test-interactive"
BATCH_KEY = "sk-test-batch"
READY_TIMEOUT_S = 240.0

CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 4
engine:
  time_scale: 10
  health_check_period_s: 1
  stop_timeout_s: 5
pools:
  small-tp1: {{tp: 1, replicas: 2}}
  big-tp2: {{tp: 2, replicas: 1}}
routes:
  interactive: {{small-tp1: 0.5, big-tp2: 0.5}}
  batch: {{small-tp1: 1.0}}
router:
  max_inflight_per_replica: 8
  queue_timeout_s: 0.2
  body_read_timeout_s: 2
auth:
  admin_token_file: {token_file}
  ray_token_file: {ray_token_file}
  api_keys:
    - {{key_env: E2E_API_KEY}}
    - {{key_env: E2E_BATCH_API_KEY, default_class: batch}}
state_file: {state_file}
"""


@dataclass
class Gateway:
    url: str
    admin_token: str
    process: subprocess.Popen
    log_path: Path

    def status(self) -> dict:
        request = urllib.request.Request(self.url + "/admin/status",
                                         headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def engine_ports(self) -> set[int]:
        return {int(url.rsplit(":", 1)[1]) for pool in self.status()["pools"].values()
                for url in pool["endpoints"].values()}

    def all_ready(self) -> bool:
        return all(p["ready_replicas"] == p["replicas"] for p in self.status()["pools"].values())

    def ray_address(self) -> str:
        """The Ray cluster the gateway runs on (its banner's ``ray:`` line)."""
        for line in self.log_path.read_text().splitlines():
            if line.strip().startswith("ray: "):
                return line.split()[1]
        raise AssertionError("no 'ray:' line in tpgate serve's banner")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return resp.read().decode()


@contextlib.contextmanager
def serve_gateway(workdir: Path, config_text: str, *, env: dict[str, str] | None = None,
                  args: tuple[str, ...] = ()) -> Iterator[Gateway]:
    """A real ``tpgate serve`` with ``config_text`` (formatted with ``token_file`` and ``state_file`` in
    ``workdir``), ready; stopped with SIGTERM at the end, which must leave no engine running."""
    config = workdir / "tpgate.yaml"
    config.write_text(config_text.format(token_file=workdir / "admin-token", state_file=workdir / "state.json",
                                         ray_token_file=RAY_TOKEN_FILE))
    port = free_port()
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
        )
    gateway = Gateway(f"http://127.0.0.1:{port}", "", process, log_path)
    try:
        wait_until(lambda: "tpgate: ready" in log_path.read_text() or process.poll() is not None,
                   timeout_s=READY_TIMEOUT_S, what="tpgate serve to be ready")
        assert process.poll() is None, f"tpgate serve exited:\n{log_path.read_text()[-3000:]}"
        gateway.admin_token = (workdir / "admin-token").read_text().strip()
        yield gateway
    finally:
        started_engines = engine_pids(gateway.engine_ports()) if process.poll() is None else {}
        process.send_signal(signal.SIGTERM)  # what a service manager sends; Ctrl-C takes the same path
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        wait_until(lambda: not any(alive(pid) for pid in started_engines), timeout_s=20,
                   what="engines to stop with the gateway")
        assert process.returncode == 0, f"tpgate serve stopped badly:\n{log_path.read_text()[-3000:]}"


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    with serve_gateway(tmp_path_factory.mktemp("gateway"), CONFIG,
                       env={"E2E_API_KEY": API_KEY, "E2E_BATCH_API_KEY": BATCH_KEY}) as running:
        yield running
