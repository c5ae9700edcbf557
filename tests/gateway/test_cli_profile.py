"""`tpgate profile` and `tpgate drift` against a scripted gateway /metrics on loopback (no Ray): every scrape
finds ten more requests of class batch, four of them in flight."""

import asyncio
import contextlib
import json
import socket
import threading
import urllib.request

import pytest
from aiohttp import web

from gateway.cli import main
from loadtests.profile import load_profile
from tests.tuner.profile_traffic import ClassTraffic
from tuner.live_profile import promql_queries


@contextlib.contextmanager
def serving_in_a_thread(routes):
    """An aiohttp app with ``routes`` (path -> handler) on loopback, in a thread of its own; yields its URL."""
    ready, stop, where = threading.Event(), None, {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        where["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        where["loop"] = asyncio.get_running_loop()
        ready.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield where["url"]
    finally:
        where["loop"].call_soon_threadsafe(stop.set)
        thread.join(10)


@contextlib.contextmanager
def scripted_gateway():
    """A gateway's /metrics; each scrape adds ten finished batch requests, four in flight."""
    traffic = ClassTraffic()
    where = {"scrapes": 0}

    async def metrics(request):
        where["scrapes"] += 1
        for i in range(10):
            traffic.request("batch", prompt=2000, output=100 + i, stream=True)
        traffic.set_inflight("batch", 4)
        return web.Response(body=traffic.metrics.exposition(), content_type="text/plain")

    with serving_in_a_thread({"/metrics": metrics}) as url:
        where["url"] = url
        yield where


def test_profile_asks_prometheus_for_the_last_window(tmp_path, capsys):
    queries = promql_queries("batch", 600)
    answers = {  # what Prometheus answers for ten minutes of batch traffic: 1,200 requests, 4 in flight
        queries["arrivals"]: [{"metric": {"api": "chat", "stream": "true"}, "value": [0, "1200"]}],
        queries["statuses"]: [{"metric": {"status": "200"}, "value": [0, "1200"]}],
        queries["slo_met"]: [{"metric": {}, "value": [0, "1200"]}],
        queries["concurrency_mean"]: [{"metric": {}, "value": [0, "4"]}],
        queries["concurrency_peak"]: [{"metric": {}, "value": [0, "6"]}],
    }
    for short, value in (("prompt", 300), ("output", 50)):
        answers[queries[f"{short}_buckets"]] = [{"metric": {"le": le}, "value": [0, "1200"]}
                                                for le in ("362.0", "+Inf")] + [
                                               {"metric": {"le": "256.0"}, "value": [0, "0"]}]
        answers[queries[f"{short}_sum"]] = [{"metric": {}, "value": [0, str(1200 * value)]}]
        answers[queries[f"{short}_count"]] = [{"metric": {}, "value": [0, "1200"]}]
    asked = []

    async def query(request):
        asked.append(request.query["query"])
        result = answers.get(request.query["query"])
        if result is None:
            return web.json_response({"status": "error", "error": "unexpected query"}, status=400)
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    out = tmp_path / "live.yaml"
    with serving_in_a_thread({"/api/v1/query": query}) as url:
        assert main(["profile", "--class", "batch", "--window", "10m", "--prometheus-url", url,
                     "--out", str(out)]) == 0
    assert sorted(asked) == sorted(queries.values())
    assert f"class batch: the last 600 s from Prometheus at {url}" in capsys.readouterr().err
    profile = load_profile(str(out))
    assert profile.arrival.rate_per_s == 2.0 and profile.users == 12  # 1,200 in 600 s; twice the peak of 6
    assert profile.prompt_tokens.model_dump() == {"kind": "fixed", "value": 300.0}
    assert profile.duration_s == 600


def test_profile_measures_the_next_window_and_writes_a_replayable_profile(tmp_path, capsys):
    out = tmp_path / "live.yaml"
    with scripted_gateway() as gateway:
        url = gateway["url"]
        status = main(["profile", "--class", "batch", "--window", "1s", "--sample-interval", "0.25",
                       "--gateway", url, "--out", str(out)])
    assert status == 0
    err = capsys.readouterr().err
    assert f"no Prometheus given: measuring the next 1 s of class batch from {url}/metrics" in err
    assert "prompt median" in err and "100% streamed" in err
    profile = load_profile(str(out))
    assert profile.workload_class.name == "batch" and profile.stream is True
    assert profile.prompt_tokens.kind == "fixed" and profile.prompt_tokens.value == 2000
    assert profile.users == 8  # twice the four in flight
    assert gateway["scrapes"] >= 3
    arrivals = profile.arrival.rate_per_s * profile.duration_s  # ten per scrape after the first
    assert arrivals == pytest.approx(10 * (gateway["scrapes"] - 1), rel=0.01)
    assert profile.duration_s >= 1.0


def test_profile_can_set_the_class_drift_reference(tmp_path, capsys):
    config = tmp_path / "tpgate.yaml"
    references = tmp_path / "drift.json"
    config.write_text(f"drift: {{reference_file: {references}}}\n")
    with scripted_gateway() as gateway:
        assert main(["profile", "--class", "batch", "--window", "0.5s", "--sample-interval", "0.25",
                     "--gateway", gateway["url"], "--config", str(config), "--set-reference"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# Recorded from the gateway's metrics")  # no --out: the YAML on stdout
    reference = json.loads(references.read_text())["references"]["batch"]
    assert reference["concurrency"] == 4 and reference["prompt_median"] > 1448  # in 2000's bucket


def test_profile_of_an_unknown_class_in_the_configuration_is_refused(tmp_path, capsys):
    config = tmp_path / "tpgate.yaml"
    config.write_text("default_class: batch\n")
    assert main(["profile", "--class", "nightly", "--config", str(config)]) == 2
    assert "--class 'nightly' is not a class" in capsys.readouterr().err


def test_profile_says_when_the_gateway_cannot_be_read(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["profile", "--class", "batch", "--window", "1s", "--gateway", f"http://127.0.0.1:{port}"]) == 2
    assert "scrape of" in capsys.readouterr().err


def test_drift_watches_reports_and_serves_its_metrics(tmp_path, capsys):
    config = tmp_path / "tpgate.yaml"
    references = tmp_path / "drift.json"
    config.write_text(f"auth: {{admin_token_file: {tmp_path / 'no-token'}}}\n"
                      f"drift:\n  interval_s: 0.2\n  reference_file: {references}\n"
                      "  classes: {batch: {window_s: 0.6, min_requests: 5}}\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    seen = []
    done = threading.Event()

    def poll():  # the monitor's own /metrics while it runs (the command runs in the main thread: signals)
        while not done.is_set():
            with contextlib.suppress(OSError):
                seen.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode())
            done.wait(0.1)

    with scripted_gateway() as gateway:
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            assert main(["drift", "--config", str(config), "--gateway", gateway["url"], "--metrics-port", str(port),
                         "--duration", "2s"]) == 0
        finally:
            done.set()
            poller.join(10)
    exposition = seen[-1] if seen else ""
    assert 'tpgate_class_drifted{class="batch"} 1.0' in exposition
    err = capsys.readouterr().err
    # the batch profile: 256 users; the traffic: 4 in flight
    assert "class batch: reference from load profile batch: concurrency 256" in err
    assert "no admin token" in err
    assert "class batch: drifted: concurrency 4 vs 256" in err
    assert "hold: the gateway's status is not read" in err
    stored = json.loads(references.read_text())
    assert stored["verdicts"]["batch"]["drifted"] is True


def test_drift_with_nothing_to_watch_says_how_to_turn_it_on(capsys):
    assert main(["drift"]) == 2
    assert "no class to watch" in capsys.readouterr().err
