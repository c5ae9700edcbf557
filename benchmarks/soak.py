"""Soak: a real `tpgate serve` (simulated engines, two pools, two classes) under mixed-class load for a long while,
sampling the resident memory and the open file descriptors of every tpgate process, to show they stay flat.

Load: ``--clients`` threads, each sending back to back, alternately an interactive streamed chat request (short
output) and a batch non-streamed completion (longer output), both classes through the class header; the pools are
sized so that some requests meet a full pool and get 429 (exercising the refusal path too). Every ``--sample-s``
seconds, every process of the gateway's tree is sampled: ``tpgate serve``, the controller, the router replicas, the
pool replicas, the engines, HAProxy, Serve's controller and proxy. A process is grouped by its role; a role's figure
is the sum over its processes (a replaced process shows as a step, and is reported).

Growth is judged on the second half of the run (after warm-up): the least-squares slope of each role's memory and
descriptors, in MiB and descriptors per 10 minutes.

Meanwhile the admin API runs its story (``--story-at-s`` into the run): an online study of class ``batch`` on the
two GPUs the production pools leave free (two trials, a light load profile of its own), the promotion of its
winner (steps 50 % then 100 %, each judged), then a rollback to the pool it replaced; each stage's start, end and
outcome are in the summary (``story``).

    nice -n 10 .venv/bin/python benchmarks/soak.py --duration-s 600 --json benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 6
engine: {{time_scale: 10, health_check_period_s: 2, stop_timeout_s: 5}}
promotion: {{steps: [0.5, 1.0], dwell_s: 10, min_requests: 10, check_period_s: 2}}
pools:
  fast-tp1: {{tp: 1, replicas: 2}}
  wide-tp2: {{tp: 2, replicas: 1}}
routes:
  interactive: {{fast-tp1: 0.7, wide-tp2: 0.3}}
  batch: {{wide-tp2: 1.0}}
router: {{replicas: 2, max_inflight_per_replica: 6, queue_timeout_s: 0.5}}
auth: {{admin_token_file: {workdir}/admin-token, ray_token_file: {workdir}/ray-token}}
state_file: {workdir}/state.json
"""
MODEL = "llama-3-8b"
ROLES = (("ray::ServeReplica:tpgate:router", "router"), ("ray::ServeReplica:pool-", "pool replica"),
         ("ray::Controller", "controller"), ("ray::ServeController", "serve controller"),
         ("ray::ProxyActor", "serve proxy"), ("ray::HAProxyManager", "haproxy manager"),
         ("ray::TuningService", "tuning service"))
STUDY = {"class": "batch", "trials": 2, "max_gpus": 2, "warmup_s": 5, "window_s": 20, "seed": 0,
         "profile": {"description": "the soak's study: a light closed loop", "users": 4,
                     "arrival": {"kind": "closed", "think_time_s": {"kind": "fixed", "value": 0.2}},
                     "prompt_tokens": {"kind": "fixed", "value": 200}, "output_tokens": {"kind": "fixed", "value": 64},
                     "stream": True, "api": "chat", "workload_class": {"name": "batch", "via": "header"},
                     "duration_s": 3600, "warmup_s": 0, "max_requests": 1000000}}
STAGE_TIMEOUT_S = 420.0


def role_of(process: psutil.Process, root_pid: int) -> str | None:
    """The tpgate role of a process of the gateway's tree (None: Ray's own, not sampled)."""
    try:
        argv, name = process.cmdline(), process.name()
    except psutil.Error:
        return None
    if process.pid == root_pid:
        return "tpgate serve"
    if "gateway.cli" in argv and "engine" in argv:
        return "engine"
    if name == "haproxy":
        return "haproxy"
    head = argv[0] if argv else ""
    return next((role for prefix, role in ROLES if head.startswith(prefix)), None)


def sample(root_pid: int) -> dict[str, dict[str, float]]:
    """Per role: processes, resident memory (MiB) and open descriptors, summed over its processes."""
    root = psutil.Process(root_pid)
    figures: dict[str, dict[str, float]] = {}
    for process in [root, *root.children(recursive=True)]:
        role = role_of(process, root_pid)
        if role is None:
            continue
        try:
            rss_mib = process.memory_info().rss / 2**20
            fds = len(os.listdir(f"/proc/{process.pid}/fd"))
        except (psutil.Error, OSError):
            continue
        entry = figures.setdefault(role, {"processes": 0, "rss_mib": 0.0, "fds": 0, "pids": 0})
        entry["processes"] += 1
        entry["rss_mib"] += rss_mib
        entry["fds"] += fds
        entry["pids"] += process.pid  # a changed sum: a process was replaced
    return figures


def one_request(port: int, n: int) -> str:
    interactive = n % 2 == 0
    path = "/v1/chat/completions" if interactive else "/v1/completions"
    body: dict[str, object] = {"model": MODEL, "max_tokens": 24 if interactive else 160, "ignore_eos": True,
                               "stream": interactive}
    if interactive:
        body["messages"] = [{"role": "user", "content": f"soak {n}"}]
    else:
        body["prompt"] = f"soak batch {n} " * 20
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={
            "content-type": "application/json", "x-workload-class": "interactive" if interactive else "batch"})
        resp = connection.getresponse()
        data = resp.read()
        if resp.status == 200 and interactive and not data.rstrip().endswith(b"data: [DONE]"):
            return "stream without [DONE]"
        return str(resp.status)
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        connection.close()


class AdminStory:
    """The admin API's part of the soak: study, promote its winner, roll back — one stage after another, in a
    thread; ``stages`` records each (name, start and end in run seconds, outcome)."""

    def __init__(self, port: int, token: str, started: float) -> None:
        self._base = f"http://127.0.0.1:{port}"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._started = started
        self.stages: list[dict] = []

    def run(self, stop: threading.Event) -> None:
        try:
            study = self._stage("study", "POST", "/admin/tuning", STUDY, poll=lambda s: f"/admin/tuning/{s['id']}",
                                done=lambda s: s["state"] != "running", outcome=lambda s: f"{s['state']}: best "
                                f"{(s.get('best') or {}).get('label')}", stop=stop)
            if study is None or not study.get("best"):
                return
            promotion = self._stage("promotion", "POST", f"/admin/tuning/{study['id']}/promote", {},
                                    poll=lambda p: f"/admin/promotions/{p['id']}", done=_promotion_ended,
                                    outcome=_promotion_outcome, stop=stop)
            if promotion is None or promotion["phase"] != "succeeded":
                return
            self._stage("rollback", "POST", "/admin/routes/batch/rollback", None,
                        poll=lambda p: f"/admin/promotions/{p['id']}", done=_promotion_ended,
                        outcome=_promotion_outcome, stop=stop)
        except urllib.error.HTTPError as exc:  # a refusal: said in the summary with the gateway's reason
            refusal = f"{exc.code}: {exc.read()[:500]!r}"
            self.stages.append({"stage": "refused", "at_s": self._now(), "outcome": refusal})
        except (OSError, ValueError, KeyError) as exc:  # said in the summary, not fatal to the soak
            self.stages.append({"stage": "error", "at_s": self._now(), "outcome": repr(exc)})

    def _stage(self, name, method, path, body, *, poll, done, outcome, stop):
        stage = {"stage": name, "start_s": self._now()}
        self.stages.append(stage)
        print(f"soak: {name} starts at {stage['start_s']:.0f} s", flush=True)
        answer = self._call(method, path, body)
        deadline = time.monotonic() + STAGE_TIMEOUT_S
        while not done(answer):
            if stop.is_set() or time.monotonic() > deadline:
                stage.update(end_s=self._now(), outcome="unfinished")
                return None
            time.sleep(2)
            answer = self._call("GET", poll(answer))
        stage.update(end_s=self._now(), outcome=outcome(answer))
        print(f"soak: {name} ended at {stage['end_s']:.0f} s: {stage['outcome']}", flush=True)
        return answer

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, headers=self._headers, method=method)
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read())

    def _now(self) -> float:
        return round(time.monotonic() - self._started, 1)


def _promotion_ended(promotion: dict) -> bool:
    return promotion["phase"] in ("succeeded", "rolled_back")


def _promotion_outcome(promotion: dict) -> str:
    return f"{promotion['phase']} to {promotion['candidate']['id']}" + (
        f" ({promotion['reason']})" if promotion.get("reason") else "")


def slope_per_10_min(times_s: list[float], values: list[float]) -> float:
    if len(times_s) < 3:
        return 0.0
    mean_t, mean_v = statistics.fmean(times_s), statistics.fmean(values)
    var = sum((t - mean_t) ** 2 for t in times_s)
    return 600.0 * sum((t - mean_t) * (v - mean_v) for t, v in zip(times_s, values, strict=True)) / var if var else 0.0


def summarize(samples: list[dict], outcomes: Counter) -> dict:
    roles = sorted({role for s in samples for role in s["roles"]})
    second_half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] / 2]
    table = {}
    for role in roles:
        series = [s for s in second_half if role in s["roles"]]
        all_series = [s for s in samples if role in s["roles"]]
        t = [s["t_s"] for s in series]
        rss = [s["roles"][role]["rss_mib"] for s in series]
        fds = [s["roles"][role]["fds"] for s in series]
        table[role] = {
            "processes": all_series[-1]["roles"][role]["processes"],
            "rss_mib_first": round(all_series[0]["roles"][role]["rss_mib"], 1),
            "rss_mib_last": round(all_series[-1]["roles"][role]["rss_mib"], 1),
            "rss_mib_max": round(max(s["roles"][role]["rss_mib"] for s in all_series), 1),
            "rss_mib_per_10min_second_half": round(slope_per_10_min(t, rss), 2),
            "fds_first": all_series[0]["roles"][role]["fds"],
            "fds_last": all_series[-1]["roles"][role]["fds"],
            "fds_max": max(s["roles"][role]["fds"] for s in all_series),
            "fds_per_10min_second_half": round(slope_per_10_min(t, fds), 2),
            "replaced": len({s["roles"][role]["pids"] for s in all_series}) > 1,
        }
    return {"requests": dict(outcomes), "sent": sum(outcomes.values()), "roles": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None, help="write samples and summary here")
    parser.add_argument("--story-at-s", type=float, default=60.0,
                        help="start the admin story (study, promotion, rollback) this long into the run")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="tpgate-soak-"))
    token = workdir / "ray-token"
    token.write_text(secrets.token_hex(32) + "\n")
    token.chmod(0o600)
    (workdir / "tpgate.yaml").write_text(CONFIG.format(workdir=workdir))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(workdir / "serve.log", "w")  # noqa: SIM115  # open for the gateway's whole life
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(workdir / "tpgate.yaml"),
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stop = threading.Event()
    outcomes: Counter = Counter()
    lock = threading.Lock()
    samples: list[dict] = []
    try:
        deadline = time.monotonic() + 300
        while "tpgate: ready" not in (workdir / "serve.log").read_text():
            if gateway.poll() is not None or time.monotonic() > deadline:
                print((workdir / "serve.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"soak: gateway ready on 127.0.0.1:{port}; {args.clients} clients for {args.duration_s:g} s",
              flush=True)

        def client(index: int) -> None:
            n = index
            while not stop.is_set():
                outcome = one_request(port, n)
                with lock:
                    outcomes[outcome] += 1
                n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        story = AdminStory(port, (workdir / "admin-token").read_text().strip(), started)
        story_timer = threading.Timer(args.story_at_s, story.run, args=(stop,))
        story_timer.start()
        while time.monotonic() - started < args.duration_s:
            t_s = time.monotonic() - started
            with lock:
                sent = sum(outcomes.values())
            samples.append({"t_s": round(t_s, 1), "sent": sent, "roles": sample(gateway.pid)})
            roles = samples[-1]["roles"]
            print(f"  t={t_s:5.0f} s  sent {sent:6d}  " + "  ".join(
                f"{role} {v['rss_mib']:.0f} MiB/{v['fds']:.0f} fd" for role, v in sorted(roles.items())), flush=True)
            time.sleep(args.sample_s)
        samples.append({"t_s": round(time.monotonic() - started, 1), "sent": sum(outcomes.values()),
                        "roles": sample(gateway.pid)})
        stop.set()
        story_timer.cancel()
        for thread in [*threads, story_timer]:
            thread.join(timeout=150)
        summary = summarize(samples, outcomes)
        summary["story"] = story.stages
        summary.update(duration_s=args.duration_s, clients=args.clients,
                       date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       load_average=os.getloadavg(), cpus=os.cpu_count())
        print(json.dumps(summary, indent=2))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"summary": summary, "samples": samples}, indent=1) + "\n")
        return 0
    finally:
        stop.set()
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(timeout=120)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gateway.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
