"""Each shipped profile, briefly, against a running target; the summary must agree with the target's metrics.

Two targets: the simulated LMDeploy engine alone (``lmdeploy:`` metrics) and the tpgate gateway with simulated
engines behind it (the test session's shared ``gateway``, ``tpgate_`` metrics per class and pool).
"""

import contextlib
import http.server
import itertools
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest

from gateway.cli import main
from loadtests import LoadRunError, load_profile, run_load, shipped_profiles, with_overrides
from loadtests import runner as runner_module
from loadtests.records import Phase, RequestRecord, read_entries
from loadtests.runner import LOCUSTFILE
from loadtests.workload import request_specs

from .targets import ClockTracker, GatewayTarget, SimEngineTarget, TargetWindow, free_port, get

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


# The session's gateway is small (llama-3-8b, 8,192-token context; 16 requests in flight for batch before it
# answers 429), and Ray Serve's proxy in front of it shares the two cores with everything else: batch runs with
# 32 users there (256 against the engine alone), and long-context's prompts are cut to fit the context.
GATEWAY_OVERRIDES = {
    "batch": {"users": 32},
    "long-context": {"prompt_tokens": {"kind": "lognormal", "mean": 6000, "sigma": 0.15, "low": 4000, "high": 7600}},
}


@pytest.fixture
def profile_target(kind, name, request):
    """A running target for profile ``name``: its own simulated engine, or the session's tpgate gateway."""
    if kind == "gateway":
        from tests.conftest import API_KEY

        yield GatewayTarget(request.getfixturevalue("gateway").url, api_key=API_KEY)
        return
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
@pytest.mark.parametrize("kind", ["sim", "gateway"])
def test_summary_agrees_with_the_targets_own_metrics(kind, name, profile_target, tmp_path):
    target = profile_target
    overrides = {**BRIEF[name], **(GATEWAY_OVERRIDES.get(name, {}) if kind == "gateway" else {})}
    profile = with_overrides(load_profile(name), drain_timeout_s=30, **overrides)
    records_path, json_path = tmp_path / "records.jsonl", tmp_path / "summary.json"

    before = target.snapshot()
    with ClockTracker(target.clock) as clock:
        summary = run_load(profile, target.url, api_key=target.api_key, json_path=json_path,
                           records_path=records_path, progress=None)
    after = target.snapshot()
    entries = read_entries(records_path)
    records = [e for e in entries if isinstance(e, RequestRecord)]
    ok = [r for r in records if r.ok]
    phases = {e.phase: e.at_s for e in entries if isinstance(e, Phase)}
    busy_s = (min(r.start_s for r in records), max(r.end_s for r in records))
    window = TargetWindow.between(before, after, families=target.families,
                                  target_seconds_per_wall_second=clock.rate(*busy_s))

    assert json.loads(json_path.read_text()) == summary.as_dict()
    assert summary.stopped_by in ("duration", "max_requests")
    assert len(records) <= profile.max_requests
    assert summary.warmup_requests + summary.requests + summary.drained_requests == len(records)
    # counts: every request the load test saw, and only those, reached the target, with the same outcome
    assert window.successes == len(ok) >= 3
    if window.by_status is None:  # the engine counts only successes: nothing may fail
        assert summary.failures == 0 and len(ok) == len(records), summary.errors
    else:  # the gateway may refuse some (429 when its pools are full): it must count exactly those
        assert window.by_status == Counter(str(r.status) for r in records)
    # lengths: the target counted exactly the prompt tokens generated and produced the output tokens asked for
    specs = list(itertools.islice(request_specs(profile), max(r.index for r in records) + 1))
    assert all(r.output_tokens == specs[r.index].output_tokens for r in ok)
    assert window.prompt_tokens == sum(r.prompt_tokens for r in ok)
    assert window.output_tokens == sum(r.output_tokens for r in ok)
    measured = [r for r in ok if phases["measure"] <= r.end_s <= phases["stop"]]
    assert summary.output_tokens == sum(r.output_tokens for r in measured)
    assert summary.elapsed_s == pytest.approx(phases["stop"] - phases["measure"])
    # latencies: the client sees the target's time plus what happens before the target sees the request (HTTP,
    # Ray Serve's proxy queue in front of the gateway, a CPU shared with everything else) — one offset, the same
    # for the first token and the last, since the tokens after the first flow at the target's pace. The engine's
    # seconds convert at its clock's average rate while requests ran, hence the relative slack.
    client_e2e_s = statistics.fmean(r.e2e_s for r in ok)
    client_ttft_s = statistics.fmean(r.ttft_s for r in ok)
    client_tpot_s = statistics.fmean(r.tpot_s for r in ok)
    ttft_offset_s, e2e_offset_s = client_ttft_s - window.ttft_mean_s, client_e2e_s - window.e2e_mean_s
    seen = (f"client e2e {client_e2e_s:.4f} s, TTFT {client_ttft_s:.4f} s, TPOT {client_tpot_s:.5f} s; "
            f"target {window}")
    assert ttft_offset_s >= -(0.2 * window.ttft_mean_s + 0.01), seen
    assert e2e_offset_s >= -(0.2 * window.e2e_mean_s + 0.01), seen
    assert abs(e2e_offset_s - ttft_offset_s) <= 0.2 * client_e2e_s + 0.1, seen
    assert ttft_offset_s <= 0.5 * client_e2e_s + 0.5, seen
    assert window.tpot_mean_s / 1.3 - 0.002 <= client_tpot_s <= window.tpot_mean_s * 1.3 + 0.002, seen
    # the exact median of the measured window against the target's bucketed one over all its requests
    assert window.e2e_p50_s / 2.5 <= summary.e2e_p50_s <= window.e2e_p50_s * 2.5 + max(e2e_offset_s, 0), seen
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
    assert "client (load generator)" in out  # the client's own load, sampled while it ran
    assert saved["client_cpu_p50_ratio"] > 0 and saved["client_lag_p50_s"] >= 0


def test_a_target_that_is_not_running_fails_the_run_with_connection_refused():
    port = free_port()  # nobody listens there
    profile = with_overrides(load_profile("interactive"), duration_s=5, warmup_s=0, max_requests=3)
    with pytest.raises(LoadRunError) as info:
        run_load(profile, f"http://127.0.0.1:{port}", progress=None)
    assert str(info.value) == f"connection refused at http://127.0.0.1:{port}"


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers every request with the class's status and an OpenAI error body."""

    status = 503

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({"error": {"message": f"answered {self.status}", "type": "x", "param": None,
                                     "code": None}}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        """Quiet."""


@contextlib.contextmanager
def answering(status: int):
    handler = type("Handler", (_Answers,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_list_refused_by_the_target_names_the_status():
    profile = with_overrides(load_profile("interactive"), duration_s=5, warmup_s=0, max_requests=3)
    with answering(401) as url, pytest.raises(LoadRunError) as info:
        run_load(profile, url, progress=None)
    assert str(info.value) == f"GET {url}/v1/models answered HTTP 401: answered 401"


def test_failed_requests_are_summarized_by_cause():
    profile = with_overrides(load_profile("interactive"), model="m", duration_s=3, warmup_s=0, max_requests=6)
    with answering(503) as url:
        summary = run_load(profile, url, progress=None)
    assert summary.requests == summary.failures == 6
    assert summary.failure_causes == {"HTTP 503": 6}
    assert summary.errors == {"HTTP 503: answered 503": 6}


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
