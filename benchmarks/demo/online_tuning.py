"""`make demo`: online tuning and staged promotion on simulated engines, while traffic flows.

1. Start `tpgate serve` on `benchmarks/demo/tpgate-demo.yaml` (InternVL2.5-38B on 12 simulated H100s; each class on one
   TP 2 pool) with a state file and admin token of its own, on a free loopback port.
2. Put each class's load on it (its profile, in wall time) for the whole demo.
3. Measure each class over a window ("before").
4. For each class: start an online study through the admin API (on the GPUs production leaves free), wait for it,
   promote its winner (a staged shift, judged at each step) and wait for the promotion.
5. Measure again ("after") and print the before/after table; stop the load and the gateway.

Figures are in the engines' clock at their nominal time scale: latencies x scale, rates / scale. Run it from a
checkout with `make demo` (a few minutes on a 2-core machine).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import yaml

from gateway.commands.admin import AdminApi
from gateway.exposition import Samples, parse_exposition, summed_increase, window_quantile
from loadtests import load_profile, run_load
from tuner.timescale import wall_profile

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "tpgate-demo.yaml"
CLASSES = ("interactive", "batch")
READY_TIMEOUT_S = 300.0
WINDOW_S = 30.0
STUDY_TRIALS = 3
LOAD_S = 3600.0  # the background load runs until the demo stops it
LOAD_STOP_TIMEOUT_S = 30.0


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


@dataclass(frozen=True)
class ClassWindow:
    """One class over a window, in the engine's clock."""

    configuration: str
    requests: float
    error_rate: float
    e2e_p99_s: float | None
    ttft_p99_s: float | None
    tpot_p99_s: float | None
    output_tokens_per_s: float
    slo_met: bool
    slo_detail: str


class StopSignal(io.TextIOBase):
    """The load runner's progress stream: raising from ``write`` stops its locust (within a progress period)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = threading.Event()
        self.at_s = 0.0  # when the demo stopped the load (Unix time)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.stopped.is_set():
            raise RuntimeError("the demo is over")
        return len(text)


class Gateway:
    def __init__(self, workdir: Path, config: Mapping[str, Any]) -> None:
        self.workdir = workdir
        self.config = dict(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config_path = self.workdir / "tpgate.yaml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path), "--port", str(self.port),
                 "--reset-state"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "tpgate: ready" not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tpgate serve did not come up:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(1)
        self.api = AdminApi(self.url, (self.workdir / "admin-token").read_text().strip())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as response:
            return parse_exposition(response.read().decode())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_load(gateway: Gateway, config: Mapping[str, Any], stop: StopSignal) -> list[threading.Thread]:
    """Each class's own profile, put into wall time, for as long as the demo runs; every request is recorded in
    the work directory (:func:`load_records`)."""
    threads = []
    scale = float(config["engine"]["time_scale"])
    for class_name in CLASSES:
        profile = wall_profile(load_profile(config["classes"][class_name]["profile"]), scale, warmup_s=0,
                               duration_s=LOAD_S, route=class_name)

        def run(profile: Any = profile, class_name: str = class_name) -> None:
            try:
                run_load(profile, gateway.url, progress=cast(TextIO, stop),
                         records_path=gateway.workdir / f"load-{class_name}.jsonl")
            except Exception as exc:  # the stop signal ends the run with an error; anything else is said
                if not stop.stopped.is_set():
                    say(f"load stopped early: {exc}")

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def load_records(workdir: Path, *, until_s: float) -> dict[str, tuple[int, int]]:
    """Per class: (requests sent before ``until_s``, Unix time, that finished; how many of them failed)."""
    outcome = {}
    for class_name in CLASSES:
        path = workdir / f"load-{class_name}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        requests = [r for r in map(json.loads, lines) if r["type"] == "request" and r["start_s"] < until_s]
        outcome[class_name] = (len(requests), sum(1 for r in requests if not r["ok"]))
    return outcome


def measure(gateway: Gateway, config: Mapping[str, Any]) -> dict[str, ClassWindow]:
    """Every class over a window of ``WINDOW_S`` wall seconds, from the gateway's own metrics."""
    state = gateway.api.get("/admin/state")
    start = gateway.scrape()
    time.sleep(WINDOW_S)
    end = gateway.scrape()
    scale = float(config["engine"]["time_scale"])
    windows = {}
    for class_name in CLASSES:
        windows[class_name] = class_window([start], [end], class_name, scale=scale, window_s=WINDOW_S,
                                           slo=config["classes"][class_name]["slo"],
                                           configuration=describe_route(state, class_name))
    return windows


def class_window(start: list[Samples], end: list[Samples], class_name: str, *, scale: float, window_s: float,
                 slo: Mapping[str, float], configuration: str) -> ClassWindow:
    def of_class(labels: Mapping[str, str]) -> bool:
        return labels.get("class") == class_name

    def failed(labels: Mapping[str, str]) -> bool:
        return of_class(labels) and not labels.get("status", "").startswith("2")

    requests = summed_increase(start, end, "tpgate_requests_total", of_class) or 0.0
    errors = summed_increase(start, end, "tpgate_requests_total", failed) or 0.0
    e2e = window_quantile(0.99, start, end, "tpgate_request_duration_seconds", of_class)
    ttft = window_quantile(0.99, start, end, "tpgate_time_to_first_token_seconds", of_class)
    tpot = window_quantile(0.99, start, end, "tpgate_time_per_output_token_seconds", of_class)
    tokens = summed_increase(start, end, "tpgate_output_tokens_total", of_class) or 0.0
    e2e_s = None if e2e is None else e2e * scale
    ttft_s = None if ttft is None else ttft * scale
    tpot_s = None if tpot is None else tpot * scale
    error_rate = errors / requests if requests else 0.0
    checks = []
    if slo.get("ttft_p99_s") is not None:
        checks.append(("TTFT", ttft_s is not None and ttft_s <= slo["ttft_p99_s"]))
    if slo.get("tpot_p99_s") is not None:
        checks.append(("TPOT", tpot_s is not None and tpot_s <= slo["tpot_p99_s"]))
    if slo.get("error_rate_max") is not None:
        checks.append(("errors", error_rate <= slo["error_rate_max"]))
    broken = [name for name, ok in checks if not ok]
    return ClassWindow(configuration=configuration, requests=requests, error_rate=error_rate, e2e_p99_s=e2e_s,
                       ttft_p99_s=ttft_s, tpot_p99_s=tpot_s, output_tokens_per_s=tokens / window_s / scale,
                       slo_met=not broken, slo_detail="yes" if not broken else "no (" + ", ".join(broken) + ")")


def describe_route(state: Mapping[str, Any], class_name: str) -> str:
    pools = state["pools"]
    parts = []
    for pool_id, weight in state["routes"][class_name].items():
        pool = pools[pool_id]
        knobs = pool["engine"]["knobs"]
        share = "" if weight >= 1 else f" {weight:.0%}"
        parts.append(f"{pool['replicas']} x TP{pool['tp']} mbs{knobs['max_batch_size']}{share}")
    return " + ".join(parts)


def tune_and_promote(gateway: Gateway, class_name: str) -> None:
    api = gateway.api
    study = api.call("POST", "/admin/tuning", {"class": class_name, "trials": STUDY_TRIALS})
    say(f"{class_name}: study {study['id']} started on up to {study['gpus']} free GPUs "
        f"(TP sizes {study['tp_sizes']}), {study['trials']} trials")
    printed: set[str] = set()
    while True:
        detail = api.get(f"/admin/tuning/{study['id']}")
        for line in detail["progress"]:
            if line not in printed and line.startswith("#"):
                printed.add(line)
                say(f"  {shorten(line)}")
        if detail["state"] != "running":
            break
        time.sleep(2)
    best = detail.get("best")
    say(f"{class_name}: study {detail['state']}; winner: " + (best["label"] if best else "none"))
    if not best:
        return
    current = running_already(api.get("/admin/state"), class_name, best["params"])
    if current is not None:
        say(f"{class_name}: the winner is what the class runs already (pool {current}): nothing to promote")
        return
    promotion = api.call("POST", f"/admin/tuning/{study['id']}/promote", {})
    say(f"{class_name}: promotion {promotion['id']} to {promotion['candidate']['id']}, steps "
        + " -> ".join(f"{w:.0%}" for w in promotion["policy"]["steps"]))
    last = ""
    while True:
        current = api.get(f"/admin/promotions/{promotion['id']}")
        line = f"{current['phase']}" + (f" step {current['step'] + 1} ({current['weight']:.0%})"
                                        if current["phase"] == "shifting" else "")
        if line != last:
            say(f"  {class_name}: {line}")
            last = line
        if current["phase"] in ("succeeded", "rolled_back"):
            for step in current["history"]:
                say(f"  {class_name}: step at {step['weight']:.0%}: {step['verdict']}: {step['reason']}")
            if current["reason"]:
                say(f"  {class_name}: {current['reason']}")
            return
        time.sleep(1)


def running_already(state: Mapping[str, Any], class_name: str, params: Mapping[str, Any]) -> str | None:
    """The pool that serves all of the class with the configuration ``params`` (tp, replicas, knobs), if one does."""
    weights = state["routes"][class_name]
    if len(weights) != 1:
        return None
    (pool_id,) = weights
    pool = state["pools"][pool_id]
    knobs = pool["engine"]["knobs"]
    same = (pool["tp"], pool["replicas"]) == (params["tp"], params["replicas"]) and all(
        knobs.get(name) == value for name, value in params.items() if name not in ("tp", "replicas"))
    return str(pool_id) if same else None


def shorten(line: str) -> str:
    """A trial line without the "best so far" tail."""
    return line.split("  best #")[0].split("  no feasible")[0]


def slo_text(slo: Mapping[str, float]) -> str:
    """A class's SLO as the table's columns name it: "TTFT p99 <= 500 ms, error rate <= 0.10%"."""
    parts = []
    for key, label in (("ttft_p99_s", "TTFT p99"), ("tpot_p99_s", "TPOT p99")):
        if slo.get(key) is not None:
            parts.append(f"{label} <= {slo[key] * 1000:,.0f} ms")
    if slo.get("error_rate_max") is not None:
        parts.append(f"errors <= {slo['error_rate_max']:.2%}")
    return ", ".join(parts)


def table(before: Mapping[str, ClassWindow], after: Mapping[str, ClassWindow]) -> str:
    def ms(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"

    rows = [("class", "", "configuration", "e2e p99", "TTFT p99", "TPOT p99", "output tok/s", "errors", "SLO met")]
    for class_name in CLASSES:
        for label, w in (("before", before[class_name]), ("after", after[class_name])):
            rows.append((class_name if label == "before" else "", label, w.configuration, ms(w.e2e_p99_s),
                         ms(w.ttft_p99_s), ms(w.tpot_p99_s), f"{w.output_tokens_per_s:,.0f}", f"{w.error_rate:.2%}",
                         w.slo_detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def stop_load(stop: StopSignal, threads: list[threading.Thread]) -> float:
    """Stop the load (each locust within a progress period); returns when it was told to, in Unix time."""
    if not stop.stopped.is_set():
        stop.stopped.set()
        say("stopping the load")
        stop.at_s = time.time()
    for thread in threads:
        thread.join(timeout=LOAD_STOP_TIMEOUT_S)
    return stop.at_s


def main() -> int:
    started_s = time.monotonic()
    config = yaml.safe_load(CONFIG.read_text())
    with tempfile.TemporaryDirectory(prefix="tpgate-demo-") as scratch:
        workdir = Path(scratch)
        config["state_file"] = str(workdir / "state.json")
        config["auth"] = {"admin_token_file": str(workdir / "admin-token")}
        for class_name in CLASSES:
            config["classes"][class_name]["profile"] = str(HERE / "profiles" / f"{class_name}.yaml")
        gateway = Gateway(workdir, config)
        stop = StopSignal()
        say(f"starting tpgate serve on {gateway.url}: {config['model']} on {config['gpus']} simulated "
            f"{config['gpu']} (engine clock x{config['engine']['time_scale']})")
        gateway.start()
        threads: list[threading.Thread] = []
        try:
            threads = start_load(gateway, config, stop)
            say("load on both classes; measuring the starting configuration")
            time.sleep(5)
            before = measure(gateway, config)
            for class_name in CLASSES:
                tune_and_promote(gateway, class_name)
            say("measuring the promoted configuration")
            after = measure(gateway, config)
            state = gateway.api.get("/admin/state")
            print()
            print(table(before, after))
            print()
            print("SLOs: " + "; ".join(f"{name} {slo_text(config['classes'][name]['slo'])}" for name in CLASSES))
            print("routes: " + json.dumps(state["routes"]))
            print()
            stopped_s = stop_load(stop, threads)
            outcome = load_records(workdir, until_s=stopped_s)
            print("requests over the whole demo, studies and promotions included: " + ", ".join(
                f"{name} {sent:,} ({failed} failed)" for name, (sent, failed) in outcome.items()))
            return 0 if all(failed == 0 for _, failed in outcome.values()) else 1
        finally:
            stop_load(stop, threads)
            say("stopping the gateway")
            gateway.stop()
            say(f"done in {(time.monotonic() - started_s) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
