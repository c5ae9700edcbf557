"""What the gateway adds: latency, throughput and streaming delays of `tpgate serve` (and, when LMDeploy is
installed, of LMDeploy's own `lmdeploy serve proxy`) against the same simulated engine hit directly.

Per phase, and side by side in one run (targets are measured in interleaved rounds, so a busy neighbour on a
small machine hurts all of them alike):

- ``tiny``: non-streaming requests with ``max_tokens`` 1 on an engine whose simulated time is negligible
  (``--time-scale`` 10000): latency p50/p99 at 1 client, then throughput at 64 concurrent clients;
- ``stream``: streamed requests at 1 client on an engine clocked so that tokens arrive about 20 ms apart
  (llama-3-8b on one H100 decodes a step in ~7.8 ms; the time scale is taken from the performance model):
  time to first token and the gap between tokens.

Targets: ``direct`` (a `tpgate engine sim` process), ``tpgate <mode>`` (a `tpgate serve` whose every class
routes to one pool of one replica; ``--mode both`` runs the standard proxy and the HAProxy fast path one after
the other, each with its own baseline), and ``lmdeploy proxy`` (`lmdeploy serve proxy` in front of its own
engine, registered with ``POST /nodes/add``). Under load the table also gives the CPU time per request of the
processes on each target's request path (engine included; for tpgate: HAProxy or Serve's HTTP proxy, the
router replica and the engine), which a busy machine disturbs far less than latency. ``--listeners`` lists
what each gateway's processes listen on. Everything listens on 127.0.0.1 (Ray's own RPC ports aside), and
everything started here is stopped on exit, Ctrl-C, SIGTERM or the ``--timeout-s`` deadline.

    .venv/bin/python benchmarks/gateway_overhead.py --mode both --listeners --json gateway-overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import ipaddress
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from gateway.planner import find_gpu, gpu_catalog, load_model
from gateway.planner.perf import StepBatch, StepCostModel

MODEL = "llama-3-8b"
GPU = "h100-80gb"
TINY_TIME_SCALE = 10_000.0  # the simulated engine's largest: a 1-token request costs it microseconds
TOKEN_GAP_S = 0.020
STREAM_CONTEXT_TOKENS = 32
LOOPBACK = "127.0.0.1"
GATEWAY_START_TIMEOUT_S = 240.0
GATEWAY_START_ATTEMPTS = 3
IN_PATH_PREFIXES = ("ray::ProxyActor", "ray::ServeReplica:tpgate:")
PROCESS_START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)
JSON_HEADERS = {"content-type": "application/json"}
CHAT_PATH = "/v1/chat/completions"

# The settings of Ray Serve's request path on the router replica, as Ray 2.60 ships them: every variant below
# names all of them, so a run measures the same thing whatever tpgate's own defaults are.
SERVE_DEFAULTS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
    "TPGATE_ROUTER__SERVE_ACCESS_LOG": "true",
    "TPGATE_HAPROXY_SKIP_DISCONNECT_WATCH": "0",
    "RAY_SERVE_HAPROXY_NBTHREAD": "4",
    "RAY_USE_UVLOOP": "1",
}
SAME_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
BUFFERED_LOGS = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "RAY_SERVE_LOG_TO_STDERR": "0"}
NO_ACCESS_LOG = {"TPGATE_ROUTER__SERVE_ACCESS_LOG": "false"}
NO_DISCONNECT_WATCH = {"TPGATE_HAPROXY_SKIP_DISCONNECT_WATCH": "1"}
# The ablation: Serve's defaults, then one setting added at a time (cumulative), then single changes on top.
VARIANTS: dict[str, dict[str, str]] = {
    "serve-defaults": SERVE_DEFAULTS,
    "+same-loop": SERVE_DEFAULTS | SAME_LOOP,
    "+buffered-logs": SERVE_DEFAULTS | SAME_LOOP | BUFFERED_LOGS,
    "+no-access-log": SERVE_DEFAULTS | SAME_LOOP | BUFFERED_LOGS | NO_ACCESS_LOG,
    "+no-disconnect-watch": SERVE_DEFAULTS | SAME_LOOP | BUFFERED_LOGS | NO_ACCESS_LOG | NO_DISCONNECT_WATCH,
    "+nbthread-1": SERVE_DEFAULTS | SAME_LOOP | BUFFERED_LOGS | NO_ACCESS_LOG | NO_DISCONNECT_WATCH
    | {"RAY_SERVE_HAPROXY_NBTHREAD": "1"},
    "+nbthread-2": SERVE_DEFAULTS | SAME_LOOP | BUFFERED_LOGS | NO_ACCESS_LOG | NO_DISCONNECT_WATCH
    | {"RAY_SERVE_HAPROXY_NBTHREAD": "2"},
    "all-but-uvloop": SERVE_DEFAULTS | SAME_LOOP | BUFFERED_LOGS | NO_ACCESS_LOG | NO_DISCONNECT_WATCH
    | {"RAY_USE_UVLOOP": "0"},
    "tpgate-defaults": {},
}


# --- results --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One target under one load, in milliseconds and requests per second."""

    run: str  # which gateway mode's run this row was measured in (each run has its own direct baseline)
    target: str
    mode: str  # latency-1, throughput-64, stream-1
    requests: int
    p50_ms: float
    p99_ms: float
    requests_per_s: float
    ttft_p50_ms: float | None = None
    gap_mean_ms: float | None = None
    added_p50_ms: float | None = None
    added_ttft_p50_ms: float | None = None
    added_gap_ms: float | None = None
    cpu_us_per_request: float | None = None  # CPU time of the processes on the request path (engine included)
    added_cpu_us_per_request: float | None = None
    failures: int = 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Samples:
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    ttfts_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    failures: int = 0  # requests that failed (connection dropped, non-200): left out of the figures

    def add(self, other: Samples) -> None:
        self.latencies_s += other.latencies_s
        self.elapsed_s += other.elapsed_s
        self.ttfts_s += other.ttfts_s
        self.gaps_s += other.gaps_s
        self.cpu_s += other.cpu_s
        self.failures += other.failures

    def row(self, run: str, target: str, mode: str) -> Row:
        ms = [s * 1000 for s in self.latencies_s]
        row = Row(run, target, mode, len(ms), percentile(ms, 50), percentile(ms, 99), len(ms) / self.elapsed_s,
                  cpu_us_per_request=self.cpu_s / len(ms) * 1e6, failures=self.failures)
        if self.ttfts_s:
            ttft_ms = [s * 1000 for s in self.ttfts_s]
            row.p50_ms, row.p99_ms = percentile(ttft_ms, 50), percentile(ttft_ms, 99)
            row.ttft_p50_ms = row.p50_ms
            row.gap_mean_ms = statistics.fmean(self.gaps_s) * 1000
        return row


# --- the client ---------------------------------------------------------------------------------------------


def chat_body(*, max_tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                            "ignore_eos": True, "stream": stream}
    return json.dumps(body).encode()


async def _request(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    started = time.perf_counter()
    async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}")
    return time.perf_counter() - started


async def closed_loop(session: aiohttp.ClientSession, url: str, *, requests: int, clients: int) -> Samples:
    """``requests`` non-streamed requests from ``clients`` concurrent clients, each sending its next request
    when the previous one is answered."""
    body = chat_body(max_tokens=1, stream=False)
    remaining = requests
    samples = Samples()

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                samples.latencies_s.append(await _request(session, url, body))
            except (aiohttp.ClientError, RuntimeError) as exc:
                samples.failures += 1
                print(f"  {url}: {exc!r}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    samples.elapsed_s = time.perf_counter() - started
    return samples


async def streams(session: aiohttp.ClientSession, url: str, *, count: int, tokens: int) -> Samples:
    """``count`` streamed requests one after another: time to the first event, gaps between events."""
    body = chat_body(max_tokens=tokens, stream=True)
    samples = Samples()
    started_all = time.perf_counter()
    for _ in range(count):
        started = time.perf_counter()
        arrivals = []
        async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}")
            async for line in resp.content:
                if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                    arrivals.append(time.perf_counter())
        if len(arrivals) < tokens:
            raise RuntimeError(f"{url}: stream carried {len(arrivals)} events, expected {tokens}")
        samples.latencies_s.append(time.perf_counter() - started)
        samples.ttfts_s.append(arrivals[0] - started)
        samples.gaps_s += [b - a for a, b in itertools.pairwise(arrivals)]
    samples.elapsed_s = time.perf_counter() - started_all
    return samples


@dataclass(frozen=True)
class Target:
    """Where to send requests, and which processes serve them (for CPU per request)."""

    url: str
    processes: Callable[[], list[psutil.Process]]

    def cpu_s(self) -> float:
        total = 0.0
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total


async def interleaved(targets: dict[str, Target], measure: Callable[[aiohttp.ClientSession, str, int], Any], *,
                      total: int, rounds: int) -> dict[str, Samples]:
    """Run ``measure`` on every target in turn, ``rounds`` times, ``total`` units per target in all."""
    results = {name: Samples() for name in targets}
    per_round = max(1, total // rounds)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=aiohttp.TCPConnector(limit=0)) as session:
        for target in targets.values():  # warm-up: connections, caches, the first JIT-ish paths
            await measure(session, target.url + CHAT_PATH, max(1, per_round // 10))
        for _ in range(rounds):
            for name, target in targets.items():
                cpu_before = target.cpu_s()
                samples: Samples = await measure(session, target.url + CHAT_PATH, per_round)
                samples.cpu_s = target.cpu_s() - cpu_before
                results[name].add(samples)
    return results


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class Processes:
    """Everything this benchmark started, stopped in reverse order. Ray's workers start their own sessions,
    so the descendants of each process are remembered while it runs and stopped if they outlive it."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[str]] = []
        self._descendants: dict[int, set[psutil.Process]] = {}

    def start(self, argv: list[str], *, env: dict[str, str] | None = None, log: Path) -> subprocess.Popen[str]:
        handle = log.open("w")
        try:
            process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, text=True, env=env,
                                       start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
                                       preexec_fn=_default_sigint)
        finally:
            handle.close()
        self._started.append(process)
        return process

    def remember_descendants(self, process: subprocess.Popen[str]) -> None:
        with contextlib.suppress(psutil.Error):
            self._descendants.setdefault(process.pid, set()).update(psutil.Process(process.pid).children(True))

    def stop(self, process: subprocess.Popen[str]) -> None:
        self.remember_descendants(process)
        if process.poll() is None:
            # SIGINT: tpgate serve tears down its pools, Serve and Ray. (On SIGTERM, Ray's own fatal-signal
            # handler, installed by ray.init, aborts the process in the middle of that teardown.)
            process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while process.poll() is None and time.monotonic() < deadline:
                self.remember_descendants(process)  # teardown can spawn processes (an HAProxy reload)
                time.sleep(0.2)
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        leftovers = [p for p in self._descendants.pop(process.pid, set()) if _alive(p)]
        if leftovers:  # Ray's agents exit on their own once the raylet is gone; give them a moment
            _, leftovers = psutil.wait_procs(leftovers, timeout=30)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # anything left in its session
        if process in self._started:
            self._started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._started)):
            self.stop(process)


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT (a benchmark started in the background); Python then installs no
    # KeyboardInterrupt handler, and SIGINT would not stop it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def _tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def start_engine(procs: Processes, workdir: Path, name: str, time_scale: float) -> Target:
    port = free_port()
    log = workdir / f"{name}.log"
    argv = [sys.executable, "-m", "gateway.cli", "engine", "sim", "--model", MODEL, "--gpu", GPU, "--tp", "1",
            "--host", LOOPBACK, "--port", str(port), "--time-scale", repr(time_scale)]
    process = procs.start(argv, log=log)
    url = f"http://{LOOPBACK}:{port}"
    _await_status(url + "/health", 200, process, log)
    return Target(url, _processes_of(process.pid))


def _processes_of(*pids: int) -> Callable[[], list[psutil.Process]]:
    handles = [psutil.Process(pid) for pid in pids]
    return lambda: handles


def _await_status(url: str, status: int, process: subprocess.Popen[str], log: Path) -> None:
    async def poll() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{log.stem} exited with {process.returncode}:\n{_tail(log)}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as resp:
                        if resp.status == status:
                            return
                await asyncio.sleep(0.2)

    asyncio.run(asyncio.wait_for(poll(), PROCESS_START_TIMEOUT_S))


def start_lmdeploy_proxy(procs: Processes, workdir: Path, engine: Target) -> Target:
    port = free_port()
    log = workdir / "lmdeploy-proxy.log"
    argv = [sys.executable, "-m", "lmdeploy", "serve", "proxy", "--server-name", LOOPBACK, "--server-port", str(port),
            "--routing-strategy", "min_expected_latency", "--disable-cache-status", "--log-level", "ERROR"]
    process = procs.start(argv, log=log)
    url = f"http://{LOOPBACK}:{port}"
    _await_status(url + "/nodes/status", 200, process, log)

    async def register() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.post(url + "/nodes/add", json={"url": engine.url}) as resp:
                answer = await resp.text()
            async with session.get(url + "/v1/models") as resp:
                models = [m["id"] for m in (await resp.json())["data"]]
        if MODEL not in models:
            raise RuntimeError(f"lmdeploy proxy did not register {engine.url}: {answer}; models {models}")

    asyncio.run(register())
    return Target(url, lambda: [psutil.Process(process.pid), *engine.processes()])


def start_bare_router(procs: Processes, workdir: Path, engine: Target, phase: str) -> Target:
    """`benchmarks/bare_router.py`: the router app under a bare uvicorn in front of ``engine``."""
    port = free_port()
    log = workdir / f"bare-router-{phase}.log"
    argv = [sys.executable, str(Path(__file__).with_name("bare_router.py")), "--engine", engine.url,
            "--port", str(port)]
    process = procs.start(argv, log=log)
    url = f"http://{LOOPBACK}:{port}"
    _await_status(url + "/v1/models", 200, process, log)
    return Target(url, lambda: [psutil.Process(process.pid), *engine.processes()])


def start_gateway(procs: Processes, workdir: Path, mode: str, time_scale: float, *, run: str,
                  env: dict[str, str]) -> tuple[Target, subprocess.Popen[str]]:
    """`tpgate serve` with one pool of one TP1 replica that every class routes to, with ``env`` added to its
    environment (Ray's processes inherit it); returns once it is ready."""
    port = free_port()
    token_file = workdir / f"admin-token-{run}"
    config = {
        "model": MODEL, "gpu": GPU, "gpus": 1,
        "engine": {"time_scale": time_scale},
        "server": {"fast_path": mode},
        "pools": {"bench": {"tp": 1, "replicas": 1}},
        "routes": {"interactive": {"bench": 1.0}, "batch": {"bench": 1.0}},
        "auth": {"admin_token_file": str(token_file)},
        # one per gateway: a gateway restores the pools a stored state holds (with their engine's time scale)
        "state_file": str(workdir / f"state-{run}-{time_scale:g}.json"),
    }
    config_path = workdir / f"tpgate-{run}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    log = workdir / f"tpgate-{run}.log"
    argv = [str(Path(sys.executable).with_name("tpgate")), "serve", "--config", str(config_path), "--port", str(port)]
    process = procs.start(argv, log=log, env={**os.environ, **env})
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
    while "tpgate: ready" not in log.read_text(errors="replace"):
        procs.remember_descendants(process)
        exit_status = process.poll()
        if exit_status is not None or time.monotonic() > deadline:
            procs.stop(process)  # and what it left behind
            what = (f"exited with {exit_status}" if exit_status is not None
                    else f"not ready within {GATEWAY_START_TIMEOUT_S:.0f} s")
            raise RuntimeError(f"tpgate serve ({run}) {what}:\n{_tail(log)}")
        time.sleep(0.5)
    procs.remember_descendants(process)
    return Target(f"http://{LOOPBACK}:{port}", lambda: request_path(process.pid)), process


def start_gateway_retrying(procs: Processes, workdir: Path, mode: str, time_scale: float, *, run: str,
                           env: dict[str, str]) -> tuple[Target, subprocess.Popen[str]]:
    """:func:`start_gateway`, tried up to :data:`GATEWAY_START_ATTEMPTS` times (on a crowded machine Ray's node
    can time out while starting: Ray waits 30 s for its raylet)."""
    for attempt in range(1, GATEWAY_START_ATTEMPTS):
        try:
            return start_gateway(procs, workdir, mode, time_scale, run=run, env=env)
        except RuntimeError as exc:
            print(f"  tpgate serve ({run}) did not start (attempt {attempt}): {str(exc).splitlines()[-1]}",
                  file=sys.stderr, flush=True)
    return start_gateway(procs, workdir, mode, time_scale, run=run, env=env)


def request_path(gateway_pid: int) -> list[psutil.Process]:
    """The gateway's processes a request passes through: HAProxy or Serve's HTTP proxy, the router replica,
    the engine (not Ray's control plane, the controller or the pool replica that only supervises the engine)."""
    found = []
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(gateway_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                argv = " ".join(child.cmdline())
                if child.name() == "haproxy" or argv.startswith(IN_PATH_PREFIXES) or " engine sim " in argv:
                    found.append(child)
    return found


def listeners(gateway_pid: int) -> list[dict[str, Any]]:
    """Listening TCP sockets of the gateway's process tree: owner, address, whether only loopback reaches it."""
    owners: dict[int, str] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(gateway_pid)
        owners[root.pid] = "tpgate serve"
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                owners[child.pid] = _owner(child.cmdline())
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in owners:
            address = conn.laddr.ip.split("%")[0]
            found.append({"owner": owners[conn.pid], "address": address, "port": conn.laddr.port,
                          "loopback_only": ipaddress.ip_address(address).is_loopback})
    return sorted(found, key=lambda entry: (entry["loopback_only"], entry["owner"], entry["port"]))


def _owner(argv: list[str]) -> str:
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]  # without the method it happens to be running
    if "engine" in argv and "sim" in argv:
        return "tpgate engine sim"
    scripts = [Path(a).name for a in argv[1:] if a.endswith(".py")]
    return f"{Path(argv[0]).name} {scripts[0]}" if scripts else Path(argv[0]).name


def stream_time_scale() -> float:
    """The engine time scale at which one decode step of llama-3-8b on one H100 takes ``TOKEN_GAP_S``."""
    cost = StepCostModel(load_model(MODEL), find_gpu(GPU, gpu_catalog({})), 1)
    step_s = cost.step_s(StepBatch(decode_sequences=1, decode_context_tokens=STREAM_CONTEXT_TOKENS))
    return step_s / TOKEN_GAP_S


# --- the benchmark -------------------------------------------------------------------------------------------


def measure_phase(phase: str, targets: dict[str, Target], run: str, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    if phase == "tiny":
        def one(session: aiohttp.ClientSession, url: str, n: int) -> Any:
            return closed_loop(session, url, requests=n, clients=1)

        def many(session: aiohttp.ClientSession, url: str, n: int) -> Any:
            return closed_loop(session, url, requests=n, clients=args.clients)

        for mode, measure in (("latency-1", one), (f"throughput-{args.clients}", many)):
            results = asyncio.run(interleaved(targets, measure, total=args.requests, rounds=args.rounds))
            rows += [samples.row(run, name, mode) for name, samples in results.items()]
    else:
        def stream(session: aiohttp.ClientSession, url: str, n: int) -> Any:
            return streams(session, url, count=n, tokens=args.stream_tokens)

        results = asyncio.run(interleaved(targets, stream, total=args.streams, rounds=args.rounds))
        rows += [samples.row(run, name, "stream-1") for name, samples in results.items()]
    for row in rows:
        base = next(r for r in rows if r.target == "direct" and r.mode == row.mode)
        if row.target == "direct":
            continue
        row.added_p50_ms = row.p50_ms - base.p50_ms
        if row.ttft_p50_ms is not None and base.ttft_p50_ms is not None:
            row.added_ttft_p50_ms = row.ttft_p50_ms - base.ttft_p50_ms
        if row.gap_mean_ms is not None and base.gap_mean_ms is not None:
            row.added_gap_ms = row.gap_mean_ms - base.gap_mean_ms
        if row.cpu_us_per_request is not None and base.cpu_us_per_request is not None:
            row.added_cpu_us_per_request = row.cpu_us_per_request - base.cpu_us_per_request
    return rows


def run_benchmark(args: argparse.Namespace, procs: Processes, workdir: Path,
                  exposure: dict[str, list[dict[str, Any]]]) -> list[Row]:
    runs = gateway_runs(args)
    with_lmdeploy = importlib.util.find_spec("lmdeploy") is not None and not args.no_lmdeploy
    if not with_lmdeploy:
        print("lmdeploy is not importable here (or --no-lmdeploy): its proxy is left out", file=sys.stderr)
    rows: list[Row] = []
    phases = [("tiny", TINY_TIME_SCALE), ("stream", stream_time_scale())]
    for phase, time_scale in [p for p in phases if args.phase in (p[0], "both")]:
        print(f"phase {phase}: engines at time scale {time_scale:g}", file=sys.stderr, flush=True)
        direct = start_engine(procs, workdir, f"engine-direct-{phase}", time_scale)
        baseline = {"direct": direct}
        if with_lmdeploy:
            behind_proxy = start_engine(procs, workdir, f"engine-lmdeploy-{phase}", time_scale)
            baseline["lmdeploy proxy"] = start_lmdeploy_proxy(procs, workdir, behind_proxy)
        if args.bare_router:
            baseline["bare router"] = start_bare_router(
                procs, workdir, start_engine(procs, workdir, f"engine-bare-{phase}", time_scale), phase)
        for run, mode, env in runs:
            print(f"  starting tpgate serve ({run}: {mode} {env or ''})", file=sys.stderr, flush=True)
            gateway_target, gateway = start_gateway_retrying(procs, workdir, mode, time_scale, run=run, env=env)
            try:
                exposure.setdefault(run, listeners(gateway.pid))
                targets = {"direct": direct, f"tpgate {run}": gateway_target} | {
                    k: v for k, v in baseline.items() if k != "direct"}
                print(f"  measuring {', '.join(targets)}", file=sys.stderr, flush=True)
                rows += measure_phase(phase, targets, run, args)
                print(markdown(rows), file=sys.stderr, flush=True)  # so far: a later failure loses nothing
            finally:
                print(f"  stopping tpgate serve ({run})", file=sys.stderr, flush=True)
                procs.stop(gateway)
        procs.stop_all()
    return rows


def gateway_runs(args: argparse.Namespace) -> list[tuple[str, str, dict[str, str]]]:
    """(run name, fast path, environment) of each `tpgate serve` to measure: the modes, or the named variants
    (each on the HAProxy fast path)."""
    if args.variant:
        return [(name, "haproxy", VARIANTS[name]) for name in args.variant]
    modes = ["standard", "haproxy"] if args.mode == "both" else [args.mode]
    return [(mode, mode, {}) for mode in modes]


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown(rows: list[Row]) -> str:
    lines = ["| run | target | mode | p50 ms | p99 ms | req/s | added p50 vs direct ms | TTFT added ms "
             "| inter-token gap ms | gap added ms | CPU us/req | CPU added us/req |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"latency-1": 0, "stream-1": 2}
    for row in sorted(rows, key=lambda r: (r.run, order.get(r.mode, 1))):
        rate = f"{row.requests_per_s:.0f}" if row.mode.startswith(("latency", "throughput")) else ""
        # CPU per request only under load: at one client the processes' idle background work dominates it
        loaded = row.mode.startswith("throughput")
        cpu = f"{row.cpu_us_per_request:.0f}" if loaded and row.cpu_us_per_request is not None else ""
        cpu_added = (f"{row.added_cpu_us_per_request:+.0f}"
                     if loaded and row.added_cpu_us_per_request is not None else "")
        target = f"{row.target} ({row.failures} failed)" if row.failures else row.target
        lines.append(f"| {row.run} | {target} | {row.mode} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | {rate} | "
                     f"{_fmt(row.added_p50_ms, True)} | {_fmt(row.added_ttft_p50_ms, True)} | "
                     f"{_fmt(row.gap_mean_ms)} | {_fmt(row.added_gap_ms, True)} | {cpu} | {cpu_added} |")
    return "\n".join(lines)


def exposure_markdown(exposure: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| mode | owner | address | port | loopback only |", "|---|---|---|---:|---|"]
    for mode, entries in exposure.items():
        lines += [f"| {mode} | {e['owner']} | {e['address']} | {e['port']} | {'yes' if e['loopback_only'] else 'NO'} |"
                  for e in entries]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("ray", "aiohttp", "lmdeploy"):
        with contextlib.suppress(Exception):
            versions[package] = __import__(package).__version__
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "load_average_at_start": os.getloadavg(), "versions": versions,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


class DeadlineExceeded(Exception):
    pass


def _raise_deadline(signum: int, frame: Any) -> None:
    raise DeadlineExceeded


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("standard", "haproxy", "both"), default="standard",
                        help="the gateway's server.fast_path to measure (default: %(default)s)")
    parser.add_argument("--phase", choices=("tiny", "stream", "both"), default="both",
                        help="tiny: non-streamed latency and throughput; stream: TTFT and token gaps (default: both)")
    parser.add_argument("--requests", type=int, default=2000,
                        help="non-streamed requests per target and load level (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients for throughput (default: 64)")
    parser.add_argument("--streams", type=int, default=60, help="streamed requests per target (default: 60)")
    parser.add_argument("--stream-tokens", type=int, default=16, help="tokens per stream (default: 16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (default: 3)")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help="measure the HAProxy fast path with this variant's settings (repeatable; replaces "
                        "--mode; see VARIANTS)")
    parser.add_argument("--bare-router", action="store_true",
                        help="also measure the router app under a bare uvicorn, outside Ray Serve "
                        "(benchmarks/bare_router.py)")
    parser.add_argument("--no-lmdeploy", action="store_true", help="leave LMDeploy's proxy out")
    parser.add_argument("--listeners", action="store_true", help="also list each gateway's listening sockets")
    parser.add_argument("--json", type=Path, help="also write the rows, listeners and the machine here")
    parser.add_argument("--timeout-s", type=int, default=1800, help="give up (and clean up) after this long")
    args = parser.parse_args(argv)

    procs = Processes()
    exposure: dict[str, list[dict[str, Any]]] = {}
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_alarm = signal.signal(signal.SIGALRM, _raise_deadline)
    signal.alarm(args.timeout_s)
    started_at = machine()
    try:
        with tempfile.TemporaryDirectory(prefix="tpgate-bench-") as tmp:
            workdir = Path(tmp)
            try:
                rows = run_benchmark(args, procs, workdir, exposure)
            except (RuntimeError, DeadlineExceeded, KeyboardInterrupt) as exc:
                procs.stop_all()
                reason = "deadline exceeded" if isinstance(exc, DeadlineExceeded) else str(exc) or "interrupted"
                print(f"gateway_overhead: {reason}", file=sys.stderr)
                return 1
            finally:
                signal.alarm(0)
                procs.stop_all()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGALRM, previous_alarm)
    print(markdown(rows))
    if args.listeners:
        print("\nListening sockets of each gateway (ports vary from run to run):\n")
        print(exposure_markdown(exposure))
    if args.json:
        report = {"machine": started_at, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "stream_time_scale": stream_time_scale(), "rows": [asdict(r) for r in rows],
                  "listeners": exposure}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
