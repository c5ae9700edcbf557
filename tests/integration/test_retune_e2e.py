"""The closed loop end to end on a real `tpgate serve` with simulated engines: class batch is tuned for two users
with long prompts; 48 users with short prompts arrive; `tpgate drift` (mode auto) detects the drift, re-tunes the
class on the GPUs production leaves free with the live profile as the load, and promotes the winner in stages —
while the load runs, with no failed request. Windows, dwell and trial counts are as short as the loop allows."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import pytest

from loadtests import run_load
from tests.conftest import API_KEY, serve_gateway
from tests.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REFERENCE_PROFILE = """
description: two users with long prompts (engine clock)
users: 2
arrival: {kind: closed, think_time_s: {kind: fixed, value: 1.0}}
prompt_tokens: {kind: fixed, value: 3000}
output_tokens: {kind: fixed, value: 64}
stream: true
api: chat
workload_class: {name: batch, via: header}
duration_s: 60
max_requests: 100000
request_timeout_s: 60
"""

CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 4
engine:
  time_scale: 2
  health_check_period_s: 1
  stop_timeout_s: 5
pools:
  batch-tp2: {{tp: 2, knobs: {{max_batch_size: 8}}}}
routes:
  batch: {{batch-tp2: 1.0}}
default_class: batch
classes:
  batch:
    objective: min_e2e_p99
    slo: {{ttft_p99_s: 30.0, error_rate_max: 0.001}}
    profile: WORKDIR/reference.yaml
router:
  max_inflight_per_replica: 96
auth:
  admin_token_file: {token_file}
  ray_token_file: {ray_token_file}
  api_keys:
    - {{key_env: E2E_API_KEY}}
state_file: {state_file}
promotion:
  steps: [0.5, 1.0]
  dwell_s: 3
  min_requests: 5
  max_inconclusive_s: 60
  max_latency_ratio: 4
  check_period_s: 1
tuning:
  knobs: {{max_batch_size: [8, 128], cache_max_entry_count: [0.8], max_prefill_token_num: [8192]}}
  warmup_s: 2
  window_s: 5
  guided_trials: 2
  max_clock_lag_ratio: 0.5
drift:
  interval_s: 3
  sample_s: 1
  reference_file: WORKDIR/drift.json
  classes:
    batch:
      mode: auto
      window_s: 6
      concurrency_ratio: 4
      prompt_median_ratio: 2
      output_median_ratio: null
      min_requests: 5
      min_retune_interval_s: 3600
      margin_ratio: 0.05
      retune_trials: 3
"""

# Wall clock: many users with short prompts, for the whole test.
SHIFTED_LOAD = """
description: 48 users with short prompts
users: 48
spawn_rate_per_s: 48
arrival: {kind: closed, think_time_s: {kind: fixed, value: 0.2}}
prompt_tokens: {kind: fixed, value: 200}
output_tokens: {kind: fixed, value: 32}
stream: true
api: chat
workload_class: {name: batch, via: header}
duration_s: 240
warmup_s: 0
max_requests: 1000000
request_timeout_s: 60
drain_timeout_s: 20
"""


class LoadStopped(Exception):
    """Raised into the load runner to stop its locust."""


class StopSignal(io.TextIOBase):
    """The load runner's progress stream: once ``stopped`` is set, writing to it stops the load."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = threading.Event()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.stopped.is_set():
            raise LoadStopped
        return len(text)


def test_a_drifted_class_is_retuned_and_its_winner_promoted_under_load_with_no_failed_request(tmp_path):
    (tmp_path / "reference.yaml").write_text(REFERENCE_PROFILE)
    (tmp_path / "shifted.yaml").write_text(SHIFTED_LOAD)
    config_text = CONFIG.replace("WORKDIR", str(tmp_path))
    with serve_gateway(tmp_path, config_text, env={"E2E_API_KEY": API_KEY}) as gateway:
        records = tmp_path / "load.jsonl"
        outcome: dict[str, object] = {}

        stop = StopSignal()

        def load() -> None:
            try:
                outcome["summary"] = run_load(tmp_path / "shifted.yaml", gateway.url, api_key=API_KEY,
                                              records_path=records, progress=stop)
            except LoadStopped:  # the test stopped it
                pass
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=load)
        thread.start()
        monitor_log = tmp_path / "drift.log"
        with open(monitor_log, "w") as log:
            monitor = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "drift", "--config", str(tmp_path / "tpgate.yaml"),
                 "--gateway", gateway.url, "--duration", "230"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "re-tune promoted" in monitor_log.read_text()
                       or "re-tune kept" in monitor_log.read_text() or "re-tune failed" in monitor_log.read_text()
                       or "re-tune rolled_back" in monitor_log.read_text() or monitor.poll() is not None,
                       timeout_s=220, what="the re-tune to end", poll_s=1.0)

            def told_of_the_retune() -> bool:
                verdict = gateway.status().get("drift", {}).get("batch", {})
                return (verdict.get("retune") or {}).get("result") is not None

            wait_until(told_of_the_retune, timeout_s=15, what="the gateway to hear how the re-tune ended")
            seen, gateway_metrics = gateway.status(), gateway.metrics()
        finally:
            monitor.terminate()
            monitor.wait(timeout=30)
            text = monitor_log.read_text()
            print(text)
        assert "class batch: drifted: concurrency" in text, text
        assert "re-tune study batch-" in text and "the current tp2x1 mbs8 " in text, text
        assert "re-tune promoted" in text, text
        # the gateway itself shows it: its state, its events, its own /metrics
        verdict = seen["drift"]["batch"]
        assert verdict["retune"]["result"] == "promoted" and not verdict["stale"], verdict
        assert verdict["live"]["concurrency_mean"] > 0 and verdict["live"]["prompt_median"] < 1000, verdict
        kinds = [e["kind"] for e in seen["events"] if e["route"] == "batch"]  # the latest 50: the promotion's last
        assert "retune.promoted" in kinds, kinds
        assert 'tpgate_class_drifted{class="batch"}' in gateway_metrics

        state = gateway.status()
        weights = state["routes"]["batch"]
        assert "batch-tp2" not in weights and sum(weights.values()) == pytest.approx(1.0), weights
        promoted = next(iter(weights))
        stored = json.loads((tmp_path / "drift.json").read_text())
        assert stored["references"]["batch"]["source"].startswith("re-tune study batch-"), stored
        assert stored["references"]["batch"]["prompt_median"] < 1000  # the live prompts, not the tuned-for ones
        assert "batch" in stored["last_retune_s"]

        time.sleep(5)  # the promoted pool serves the whole class for a while before the load stops
        stop.stopped.set()
        thread.join(timeout=120)
        assert "error" not in outcome, outcome
        requests = [json.loads(line) for line in records.read_text().splitlines()]
        requests = [r for r in requests if r["type"] == "request"]
        assert len(requests) > 100
        assert [r for r in requests if not r["ok"]] == []
        assert promoted.startswith("batch-tp")
