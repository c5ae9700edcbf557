"""Each shipped profile, briefly, against a running target; the summary must agree with the target's metrics.

The target is the simulated LMDeploy engine (``targets.SimEngineTarget``); a target for the tpgate gateway
plugs into the same fixture once the gateway serves ``tpgate_`` metrics.
"""

import itertools
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from gateway.cli import main
from loadtests import LoadRunError, load_profile, run_load, shipped_profiles, with_overrides
from loadtests import runner as runner_module
from loadtests.records import Phase, RequestRecord, read_entries
from loadtests.runner import LOCUSTFILE
from loadtests.workload import request_specs

from .targets import ClockTracker, SimEngineTarget, TargetWindow, free_port, get

pytestmark = pytest.mark.integration

# A few seconds each, with small caps; batch keeps its 256 concurrent users.
BRIEF = {
    "interactive": {"duration_s": 4, "warmup_s": 1, "max_requests": 60},
    "batch": {"duration_s": 3, "warmup_s": 1, "max_requests": 300},
    "long-context": {"duration_s": 4, "warmup_s": 1, "max_requests": 40},
    "sharegpt-like": {"duration_s": 4, "warmup_s": 1, "max_requests": 60},
}
# The engine each profile runs against, and how much faster than real time. A faster clock shortens the test
# but magnifies the client's own per-token overhead, so profiles judged on latency run closer to real time;
# batch is judged on throughput and runs fast. long-context needs a model whose context holds 12k tokens.
SIM_TARGETS = {
    "interactive": ("llama-2-7b", 2.0),
    "batch": ("llama-2-7b", 20.0),
    "long-context": ("qwen2_5-7b", 5.0),
    "sharegpt-like": ("llama-2-7b", 5.0),
}


@pytest.fixture
def profile_target(name):
    """A running target for profile ``name`` (the simulated engine; later also the gateway)."""
    model, time_scale = SIM_TARGETS[name]
    sim = SimEngineTarget(model=model, gpu="a100-80gb", tp=1, time_scale=time_scale)
    yield sim
    sim.close()


@pytest.fixture(scope="module")
def target():
    sim = SimEngineTarget(model="llama-2-7b", gpu="a100-80gb", tp=1, time_scale=5.0)
    yield sim
    sim.close()


def test_every_shipped_profile_is_covered():
    assert sorted(BRIEF) == sorted(SIM_TARGETS) == shipped_profiles()


@pytest.mark.parametrize("name", sorted(BRIEF))
def test_summary_agrees_with_the_targets_own_metrics(name, profile_target, tmp_path):
    target = profile_target
    profile = with_overrides(load_profile(name), drain_timeout_s=30, **BRIEF[name])
    records_path, json_path = tmp_path / "records.jsonl", tmp_path / "summary.json"

    before = target.snapshot()
    with ClockTracker(target.clock_s) as clock:
        summary = run_load(profile, target.url, json_path=json_path, records_path=records_path, progress=None)
    after = target.snapshot()
    entries = read_entries(records_path)
    records = [e for e in entries if isinstance(e, RequestRecord)]
    phases = {e.phase: e.at_s for e in entries if isinstance(e, Phase)}
    busy_s = (min(r.start_s for r in records), max(r.end_s for r in records))
    window = TargetWindow.between(before, after, target_seconds_per_wall_second=clock.rate(*busy_s))

    assert json.loads(json_path.read_text()) == summary.as_dict()
    assert summary.failures == 0, summary.errors
    assert summary.stopped_by in ("duration", "max_requests")
    assert summary.requests >= 3
    assert len(records) <= profile.max_requests
    # counts: every request the load test saw, and only those, reached the engine
    assert window.requests == len(records)
    assert summary.warmup_requests + summary.requests + summary.drained_requests == len(records)
    # lengths: the engine counted exactly the prompt tokens generated and produced the output tokens asked for
    specs = list(itertools.islice(request_specs(profile), max(r.index for r in records) + 1))
    assert all(r.output_tokens == specs[r.index].output_tokens for r in records)
    assert window.prompt_tokens == sum(r.prompt_tokens for r in records)
    assert window.output_tokens == sum(r.output_tokens for r in records)
    measured = [r for r in records if phases["measure"] <= r.end_s <= phases["stop"]]
    assert summary.output_tokens == sum(r.output_tokens for r in measured)
    assert summary.elapsed_s == pytest.approx(phases["stop"] - phases["measure"])
    # latencies: the client sees the engine's time plus its own overheads (HTTP, parsing, a CPU shared with the
    # engine and whatever else runs), a few tens of milliseconds on a busy two-core machine
    client_e2e_s = statistics.fmean(r.e2e_s for r in records)
    client_ttft_s = statistics.fmean(r.ttft_s for r in records)
    # (the engine's seconds are converted at its clock's average rate while requests ran, hence the slack)
    seen = f"client e2e {client_e2e_s:.4f} s, TTFT {client_ttft_s:.4f} s; target {window}"
    assert window.e2e_mean_s <= client_e2e_s * 1.2 + 0.01, seen
    assert client_e2e_s <= window.e2e_mean_s * 1.5 + 0.1, seen
    assert window.ttft_mean_s <= client_ttft_s * 1.2 + 0.01, seen
    assert client_ttft_s <= window.ttft_mean_s * 1.5 + 0.1, seen
    # the exact median of the measured window against the engine's bucketed one over all requests
    assert window.e2e_p50_s / 2.5 <= summary.e2e_p50_s <= window.e2e_p50_s * 2.5, seen
    assert summary.ttft_p50_s <= summary.ttft_p99_s <= summary.e2e_p99_s
    assert summary.tpot_p50_s <= summary.tpot_p99_s < summary.e2e_p50_s


def test_the_request_cap_stops_the_run(target):
    profile = with_overrides(load_profile("interactive"), max_requests=5, warmup_s=0, duration_s=60)
    summary = run_load(profile, target.url, progress=None)
    assert summary.stopped_by == "max_requests"
    assert summary.requests == 5 and summary.failures == 0
    assert summary.elapsed_s < 10  # it did not wait for the 60 s duration


def test_cli_prints_progress_and_the_table(target, tmp_path, capsys):
    json_path = tmp_path / "s.json"
    status = main(["load", "--profile", "sharegpt-like", "--host", target.url, "--duration", "3s", "--warmup", "0",
                   "--users", "2", "--max-requests", "20", "--json", str(json_path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.splitlines()[0].split() == ["profile", "sharegpt-like"]
    assert "TTFT p50 / p95 / p99" in out and "output tokens/s" in out
    assert "measuring" in err  # live progress
    saved = json.loads(json_path.read_text())
    assert saved["requests"] >= 1 and saved["failures"] == 0 and saved["ttft_p99_s"] > 0


def test_a_target_without_models_fails_the_run(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    profile = with_overrides(load_profile("interactive"), duration_s=5, warmup_s=0, max_requests=3)
    with pytest.raises(LoadRunError, match="/v1/models"):
        run_load(profile, f"http://127.0.0.1:{port}", progress=None)


def test_the_hard_time_limit_kills_a_run_that_overstays(monkeypatch):
    # a server that accepts connections and never answers: requests hang until the limit
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []

    def accept_forever():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # the test closed the server
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    monkeypatch.setattr(runner_module, "hard_limit_s", lambda profile: 6.0)
    profile = with_overrides(load_profile("interactive"), model="m", duration_s=60, warmup_s=0, max_requests=10,
                             request_timeout_s=120, drain_timeout_s=1)
    try:
        summary = run_load(profile, f"http://127.0.0.1:{server.getsockname()[1]}", progress=None)
    finally:
        server.close()
        for connection in accepted:
            connection.close()
    assert summary.stopped_by == "time_limit"
    assert summary.requests == 0
    assert accepted  # the users did connect


def test_locust_web_ui_runs_a_profile_and_stops_it_at_its_duration(target, tmp_path):
    profile_path = tmp_path / "short.yaml"
    profile_path.write_text(
        "users: 3\narrival: {kind: closed}\nprompt_tokens: {kind: fixed, value: 200}\n"
        "output_tokens: {kind: fixed, value: 40}\nduration_s: 2\nmax_requests: 1000\n"
    )
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--workload-profile", str(profile_path),
         "--host", target.url, "--web-host", "127.0.0.1", "--web-port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                page = get(f"{ui}/").decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the web UI did not come up"
                time.sleep(0.3)
        assert '"num_users": 3' in page  # the form defaults to the profile's users
        swarm = urllib.request.Request(f"{ui}/swarm", data=b"user_count=3&spawn_rate=3", method="POST")
        assert json.loads(urllib.request.urlopen(swarm, timeout=5).read())["success"]
        deadline = time.monotonic() + 15
        while (stats := json.loads(get(f"{ui}/stats/requests")))["state"] != "stopped":
            assert time.monotonic() < deadline, f"still {stats['state']} after the profile's 2 s"
            time.sleep(0.5)
        by_type = {row["method"]: row for row in stats["stats"] if row["name"] == "chat (stream)"}
        assert set(by_type) == {"POST", "TTFT", "TPOT"}
        assert by_type["POST"]["num_requests"] == by_type["TTFT"]["num_requests"] >= 3
        assert by_type["TPOT"]["avg_content_length"] == 40  # "size" of the token entries: output tokens
        assert by_type["TTFT"]["avg_response_time"] < by_type["POST"]["avg_response_time"]
        assert locust.poll() is None  # the UI stays up for the next test
    finally:
        locust.terminate()
        locust.wait(timeout=10)
