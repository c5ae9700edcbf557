"""End to end through a real `tpgate serve` (Ray, Serve, simulated engines, locust): the admin API behind its token
on every route of its schema, a promotion under continuous load that loses no request, a deliberately slow
candidate (its engines slowed by a deviation file) rolled back by itself with the reason in the state, an online
study on the GPUs production leaves free whose winner is promoted, a restart that restores the routes and the
history, and a restart half-way through a promotion, which the new gateway settles (rolls back) at start. The tests
share one gateway and run in order."""

from __future__ import annotations

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
from pathlib import Path

import pytest

from loadtests import run_load
from tests.processes import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

API_KEY = "sk-admin-e2e"
READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 150.0

# Engines on TP 2 decode 20 times slower than the model predicts: a candidate at TP 2 is the bad one.
DEVIATION = "decode_efficiency_factor_by_tp: {2: 0.05}\n"

# A class's load for online trials, in the engine's clock (the tuner puts it into wall time).
CLASS_PROFILE = """
description: a few streamed chats
users: 3
arrival: {{kind: closed, think_time_s: {{kind: fixed, value: 2.0}}}}
prompt_tokens: {{kind: fixed, value: 200}}
output_tokens: {{kind: fixed, value: 24}}
stream: true
api: chat
workload_class: {{name: {name}, via: header}}
duration_s: 60
max_requests: 100000
request_timeout_s: 60
drain_timeout_s: 20
"""

# Load put on the gateway directly (wall-clock times).
LOAD_PROFILE = """
description: steady streamed chat while a promotion runs
users: 3
arrival: {{kind: closed, think_time_s: {{kind: fixed, value: 0.15}}}}
prompt_tokens: {{kind: fixed, value: 200}}
output_tokens: {{kind: fixed, value: 24}}
stream: true
api: chat
workload_class: {{name: {name}, via: header}}
duration_s: {duration_s}
max_requests: 100000
request_timeout_s: 30
drain_timeout_s: 15
"""

CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 4
engine:
  time_scale: 2
  health_check_period_s: 1
  stop_timeout_s: 5
  deviation_file: {workdir}/deviation.yaml
pools:
  inter-tp1: {{tp: 1}}
  batch-tp1: {{tp: 1}}
routes:
  interactive: {{inter-tp1: 1.0}}
  batch: {{batch-tp1: 1.0}}
classes:
  interactive:
    objective: min_e2e_p99
    slo: {{ttft_p99_s: 0.5, tpot_p99_s: 0.04}}
    profile: {workdir}/interactive.yaml
  batch:
    objective: max_output_tokens_per_s
    slo: {{ttft_p99_s: 5.0, error_rate_max: 0.001}}
    profile: {workdir}/batch.yaml
router:
  max_inflight_per_replica: 64
auth:
  admin_token_file: {workdir}/admin-token
  api_keys:
    - {{key_env: ADMIN_E2E_API_KEY}}
state_file: {workdir}/state.json
promotion:
  steps: [0.25, 1.0]
  dwell_s: 6
  min_requests: 10
  max_inconclusive_s: 40
  max_latency_ratio: 3
  check_period_s: 1
tuning:
  knobs: {{max_batch_size: [128], cache_max_entry_count: [0.8], max_prefill_token_num: [8192]}}
  warmup_s: 3
  window_s: 6
  guided_trials: 1
  max_clock_lag_ratio: 0.5
"""


class Gateway:
    """A `tpgate serve` of this module's own, restartable on the same state file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.token = ""
        self.starts = 0

    def start(self, *, reset: bool) -> None:
        self.starts += 1
        log_path = self.workdir / f"serve-{self.starts}.log"
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.workdir / "tpgate.yaml"),
                "--port", str(self.port), *(["--reset-state"] if reset else [])]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "ADMIN_E2E_API_KEY": API_KEY})
        process = self.process
        wait_until(lambda: "tpgate: ready" in log_path.read_text() or process.poll() is not None,
                   timeout_s=READY_TIMEOUT_S, what="tpgate serve to be ready")
        assert process.poll() is None, f"tpgate serve exited:\n{log_path.read_text()[-3000:]}"
        self.token = (self.workdir / "admin-token").read_text().strip()
        self.log_path = log_path

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same state file."""
        self.stop()
        self.start(reset=False)

    def call(self, method: str, path: str, body: object = None, *, token: str | None = "") -> tuple[int, object]:
        headers = {"content-type": "application/json"}
        token = self.token if token == "" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            with exc:
                raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def state(self) -> dict:
        status, state = self.call("GET", "/admin/state")
        assert status == 200, state
        return state

    def wait_promotion(self, promotion_id: str, *, timeout_s: float) -> dict:
        found: dict = {}

        def ended() -> bool:
            found.update(self.call("GET", f"/admin/promotions/{promotion_id}")[1])
            return found["phase"] in ("succeeded", "rolled_back")

        wait_until(ended, timeout_s=timeout_s, what=f"promotion {promotion_id} to end", poll_s=1.0)
        return found


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("admin-e2e")
    (workdir / "deviation.yaml").write_text(DEVIATION)
    for name in ("interactive", "batch"):
        (workdir / f"{name}.yaml").write_text(CLASS_PROFILE.format(name=name))
    (workdir / "tpgate.yaml").write_text(CONFIG.format(workdir=workdir))
    gateway = Gateway(workdir)
    gateway.start(reset=True)
    try:
        yield gateway
    finally:
        gateway.stop()


class Load:
    """Locust against the gateway in the background, every request recorded."""

    def __init__(self, gateway: Gateway, class_name: str, duration_s: float) -> None:
        profile = gateway.workdir / f"load-{class_name}.yaml"
        profile.write_text(LOAD_PROFILE.format(name=class_name, duration_s=duration_s))
        self.records = gateway.workdir / f"load-{class_name}-{time.monotonic_ns()}.jsonl"
        self.summary = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.summary = run_load(profile, gateway.url, api_key=API_KEY, records_path=self.records,
                                        progress=None)
            except BaseException as exc:  # reported by the test
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def finish(self) -> list[dict]:
        self.thread.join(timeout=300)
        assert self.error is None, self.error
        lines = [json.loads(line) for line in self.records.read_text().splitlines()]
        return [line for line in lines if line["type"] == "request"]


def test_every_route_in_the_schema_needs_the_token(gateway):
    status, schema = gateway.call("GET", "/admin/openapi.json")
    assert status == 200
    for path, methods in schema["paths"].items():
        concrete = (path.replace("{pool_id}", "inter-tp1").replace("{class_name}", "batch")
                    .replace("{study_id}", "s").replace("{promotion_id}", "p"))
        for method in methods:
            status, body = gateway.call(method.upper(), concrete, token=None)
            assert status == 401 and body["error"]["type"] == "authentication_error", (method, path, body)
            status, body = gateway.call(method.upper(), concrete, token="not-the-token")
            assert status == 403 and body["error"]["type"] == "permission_error", (method, path, body)
    assert gateway.call("GET", "/admin/status", token="not-the-token")[0] == 403


def test_a_slow_candidate_is_rolled_back_by_itself_with_the_reason_in_the_state(gateway):
    load = Load(gateway, "interactive", duration_s=40)
    time.sleep(3)
    status, promotion = gateway.call("POST", "/admin/promotions", {"class": "interactive", "id": "inter-slow-tp2",
                                                                   "tp": 2})
    assert status == 202, promotion
    final = gateway.wait_promotion(promotion["id"], timeout_s=120)
    requests = load.finish()
    assert final["phase"] == "rolled_back", final
    # decoding 20 x slower shows in both: time per token, and time to the first token (its decode step)
    assert re.match(r"step 1 \(25%\) failed: (TTFT|TPOT) p99 .* (over the class's SLO|the old pools')",
                    final["reason"]), final["reason"]
    state = gateway.state()
    assert state["routes"]["interactive"] == {"inter-tp1": 1.0}
    assert next(p for p in state["promotions"] if p["id"] == promotion["id"])["reason"] == final["reason"]
    assert any(e["kind"] == "promotion.rolled_back" and final["reason"] in e["message"] for e in state["events"])
    assert [r for r in requests if not r["ok"]] == []  # slow, but nothing failed
    wait_until(lambda: "inter-slow-tp2" not in gateway.state()["pools"], timeout_s=60,
               what="the slow pool to be removed")


def test_a_promotion_under_continuous_load_loses_no_request(gateway):
    load = Load(gateway, "batch", duration_s=45)
    time.sleep(5)
    status, promotion = gateway.call("POST", "/admin/promotions", {"class": "batch", "id": "batch-tp1x2", "tp": 1,
                                                                   "replicas": 2})
    assert status == 202, promotion
    seen_weights = set()

    def ended() -> bool:
        state = gateway.state()
        seen_weights.add(tuple(sorted(state["routes"]["batch"].items())))
        return state["promotions"][-1]["phase"] in ("succeeded", "rolled_back")

    wait_until(ended, timeout_s=120, what="the promotion to end", poll_s=1.0)
    requests = load.finish()
    final = gateway.call("GET", f"/admin/promotions/{promotion['id']}")[1]
    assert final["phase"] == "succeeded", final
    assert [step["verdict"] for step in final["history"]] == ["pass", "pass"]
    assert (("batch-tp1", 0.75), ("batch-tp1x2", 0.25)) in seen_weights  # the first step was visible
    failed = [r for r in requests if not r["ok"]]
    assert len(requests) > 200 and failed == [], failed[:5]
    state = gateway.state()
    assert state["routes"]["batch"] == {"batch-tp1x2": 1.0}
    kinds = [e["kind"] for e in state["events"] if e["route"] == "batch"]
    assert "promotion.started" in kinds and "promotion.check" in kinds and "promotion.succeeded" in kinds
    wait_until(lambda: "batch-tp1" not in gateway.state()["pools"] and not gateway.state()["draining"],
               timeout_s=60, what="the old pool to be drained and deleted")


def test_an_online_study_uses_the_free_gpus_and_its_winner_is_promoted(gateway):
    state = gateway.state()
    assert state["gpus"]["free"] == 1  # batch-tp1x2 and inter-tp1 hold 3 of 4
    status, study = gateway.call("POST", "/admin/tuning", {"class": "interactive", "trials": 1})
    assert status == 202 and study["gpus"] == 1, study
    status, again = gateway.call("POST", "/admin/tuning", {"class": "batch"})
    assert status == 409 and "no GPU free for a study of class 'batch'" in again["error"]["message"]
    trial_routes_seen = []

    def ended() -> bool:
        current = gateway.state()
        trial_routes_seen.extend(current["trial_routes"].values())
        assert all(not pool.startswith("t-") for weights in current["routes"].values() for pool in weights)
        return gateway.call("GET", f"/admin/tuning/{study['id']}")[1]["state"] != "running"

    wait_until(ended, timeout_s=240, what="the study to end", poll_s=1.0)
    detail = gateway.call("GET", f"/admin/tuning/{study['id']}")[1]
    assert detail["state"] == "completed", (detail["reason"], detail["progress"])
    (trial,) = detail["trial_records"]
    assert trial["outcome"] == "feasible", trial
    assert trial_routes_seen and all(r["class"] == "interactive" for r in trial_routes_seen)
    status, report = gateway.call("GET", f"/admin/tuning/{study['id']}/report")
    assert status == 200 and "<html" in report
    load = Load(gateway, "interactive", duration_s=40)
    time.sleep(3)
    status, promotion = gateway.call("POST", f"/admin/tuning/{study['id']}/promote")
    assert status == 202, promotion
    final = gateway.wait_promotion(promotion["id"], timeout_s=120)
    requests = load.finish()
    assert final["phase"] == "succeeded", final
    assert [r for r in requests if not r["ok"]] == []
    assert gateway.state()["studies"][-1]["promotion"] == promotion["id"]


def test_a_restart_restores_the_routes_and_the_history(gateway):
    before = gateway.state()
    gateway.restart()
    assert "restored" in gateway.log_path.read_text()
    after = gateway.state()
    assert after["routes"] == before["routes"]
    assert set(after["pools"]) == set(before["pools"])
    assert [p["id"] for p in after["promotions"]] == [p["id"] for p in before["promotions"]]
    assert [(s["id"], s["state"]) for s in after["studies"]] == [(s["id"], s["state"]) for s in before["studies"]]


def test_a_promotion_interrupted_by_a_restart_is_rolled_back_then_a_rollback_completes(gateway):
    before = gateway.state()["routes"]["batch"]
    assert before == {"batch-tp1x2": 1.0}  # the promotion under load made it so
    # Without load the first step (25 %) holds, inconclusive, for up to 40 s: restart the gateway there.
    status, body = gateway.call("POST", "/admin/promotions", {"class": "batch", "id": "batch-halfway", "tp": 1})
    assert status == 202, body
    wait_until(lambda: gateway.state()["routes"]["batch"] == {"batch-tp1x2": 0.75, "batch-halfway": 0.25},
               timeout_s=120, poll_s=0.5, what="the promotion's first step")
    gateway.restart()  # half-way through: the new gateway must settle it, not leave it there
    interrupted = gateway.wait_promotion(body["id"], timeout_s=60)
    assert interrupted["phase"] == "rolled_back", interrupted
    assert interrupted["reason"].startswith("interrupted by a restart during shifting"), interrupted["reason"]
    state = gateway.state()
    assert state["routes"]["batch"] == before
    assert any(e["kind"] == "promotion.rolled_back" and body["id"] in e["message"] for e in state["events"])
    wait_until(lambda: "batch-halfway" not in gateway.state()["pools"] and not gateway.state()["draining"],
               timeout_s=90, what="the interrupted promotion's pool to be drained and deleted")
    status, back = gateway.call("POST", "/admin/routes/batch/rollback")  # undo the promotion under load
    assert status == 202, back
    final = gateway.wait_promotion(back["id"], timeout_s=120)
    assert final["phase"] == "succeeded" and final["source"].startswith("rollback of batch-"), final
    assert gateway.state()["routes"]["batch"] == {"batch-tp1": 1.0}
