"""Round trip on a real `tpgate serve` with simulated engines: load of a known shape, `tpgate profile` from the
gateway's /metrics while it runs, and `tpgate load` replaying the recorded profile with no failed request."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from loadtests.profile import load_profile
from tests.conftest import API_KEY

pytestmark = pytest.mark.integration

SHAPE = """
description: 6 users, ~600-token prompts, 20-token answers, streamed, class batch
users: 6
arrival: {kind: closed, think_time_s: {kind: uniform, low: 0.05, high: 0.15}}
prompt_tokens: {kind: lognormal, mean: 600, sigma: 0.3, low: 100, high: 3000}
output_tokens: {kind: fixed, value: 20}
stream: true
api: chat
workload_class: {name: batch, via: header}
duration_s: 14
warmup_s: 0
max_requests: 20000
request_timeout_s: 60
drain_timeout_s: 10
seed: 5
"""


def tpgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def test_a_recorded_profile_replays_the_shape_it_saw(gateway, tmp_path):
    shape = tmp_path / "shape.yaml"
    shape.write_text(SHAPE)
    recorded = tmp_path / "recorded.yaml"
    load = subprocess.Popen(tpgate("load", "--profile", str(shape), "--host", gateway.url, "--api-key", API_KEY,
                                   "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        profiled = subprocess.run(tpgate("profile", "--class", "batch", "--window", "8s", "--gateway", gateway.url,
                                         "--out", str(recorded)),
                                  capture_output=True, text=True, timeout=60)
    finally:
        _, err = load.communicate(timeout=120)
    assert load.returncode == 0, err[-2000:]
    assert profiled.returncode == 0, profiled.stderr[-2000:]
    assert "no Prometheus given: measuring the next 8 s of class batch" in profiled.stderr

    profile = load_profile(str(recorded))
    assert profile.workload_class.name == "batch" and profile.stream is True and profile.api == "chat"
    assert profile.output_tokens.kind == "fixed" and profile.output_tokens.value == 20
    # the engine counts the prompt's tokens itself (with the chat template), so its median sits near 600
    assert profile.prompt_tokens.kind in ("lognormal", "uniform")
    rng = random.Random(1)
    median = sorted(profile.prompt_tokens.sample(rng) for _ in range(401))[200]
    assert 400 <= median <= 900, median
    assert 1 <= profile.users <= 2 * 6  # twice the peak in flight, which six users bound
    assert profile.arrival.kind == "open" and profile.arrival.rate_per_s > 1

    summary_path = tmp_path / "replay.json"
    replay = subprocess.run(tpgate("load", "--profile", str(recorded), "--host", gateway.url, "--api-key", API_KEY,
                                   "--duration", "4s", "--json", str(summary_path), "--quiet"),
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr[-2000:]
    summary = json.loads(summary_path.read_text())
    assert summary["requests"] >= 4 and summary["failures"] == 0
    assert summary["output_tokens"] == 20 * summary["requests"]
