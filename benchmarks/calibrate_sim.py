"""Calibrate the simulated engine against LMDeploy's published A100 figures.

Replays each setup of ``shared/reference/lmdeploy-benchmarks.md`` against a running ``tpgate engine sim``
(a subprocess on a free loopback port) and prints simulated vs published figures with their ratio:

- request throughput: 3,000 requests with log-normal prompt and output lengths of the published means,
  a closed loop of ``max batch`` concurrent clients (as LMDeploy's ``profile_throughput`` does);
- static batches: ``batch`` identical requests sent together (as ``profile_generation`` does).

Figures are measured from the engine (token counts from the responses' ``usage``, times from its simulated
clock in ``/sim/stats`` and its ``/metrics``), in simulated seconds, never from the analytical model.
``--cpu`` instead measures the engine process's CPU use while it serves 256 concurrent streams in real time.

    .venv/bin/python benchmarks/calibrate_sim.py [--cpu] [--time-scale 10]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp

from gateway.engines.sim.text import text_for_tokens

SEED = 20240601
# Log-normal spread (sigma of the underlying normal) of prompt and output lengths. The published rows give
# only the means; the spread decides how close 256 running sequences come to the KV-cache capacity, and so
# the first-token latency. One value for every setup, chosen once: see docs/simulator.md.
LENGTH_SIGMA = 0.4
# The benchmark's ShareGPT filter (LMDeploy's profile_throughput, after vLLM's): pairs outside are redrawn.
MIN_TOKENS, MAX_PROMPT_TOKENS, MAX_SEQUENCE_TOKENS = 4, 1024, 2048
TIMEOUT = aiohttp.ClientTimeout(total=3600)


@dataclass(frozen=True)
class Row:
    setup: str
    metric: str
    simulated: float
    published: float

    @property
    def ratio(self) -> float:
        return self.simulated / self.published


@dataclass(frozen=True)
class ThroughputSetup:
    model: str
    tp: int
    batch: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_s: float | None

    # The mean lengths follow from the published row: (total - output tok/s) / req/s and output tok/s / req/s.
    @property
    def mean_prompt_tokens(self) -> float:
        return (self.total_tokens_per_s - self.output_tokens_per_s) / self.requests_per_s

    @property
    def mean_output_tokens(self) -> float:
        return self.output_tokens_per_s / self.requests_per_s


THROUGHPUT = (
    ThroughputSetup("llama-2-7b", 1, 256, 14.556, 3387, 6981, 0.526),
    ThroughputSetup("internlm-20b", 2, 128, 10.291, 2053, 4345, None),
)
# (batch, prompt tokens, output tokens, published output tokens/s), Llama-2-7B TP1
STATIC = (
    (1, 1, 128, 100.0), (16, 1, 128, 1504.7), (32, 1, 128, 2136.7), (64, 1, 128, 4154.8), (64, 2048, 2048, 755.65),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def engine(model: str, tp: int, *, time_scale: float, extra: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """A simulated engine subprocess on a free loopback port; yields (base URL, pid)."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway.cli", "engine", "sim", "--model", model, "--gpu", "a100-80gb",
            "--tp", str(tp), "--host", "127.0.0.1", "--port", str(port), "--time-scale", str(time_scale), *extra]
    process = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_wait_healthy(url, process))
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


async def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for _ in range(200):
            if process.poll() is not None:
                raise RuntimeError(f"engine exited with status {process.returncode}")
            try:
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("engine did not become healthy")


def sample_lengths(rng: random.Random, prompt_mean: float, output_mean: float, count: int) -> list[tuple[int, int]]:
    """(prompt, output) token pairs: independent log-normals of the given means, filtered like ShareGPT."""
    mu_prompt = math.log(prompt_mean) - LENGTH_SIGMA**2 / 2
    mu_output = math.log(output_mean) - LENGTH_SIGMA**2 / 2
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        prompt = round(rng.lognormvariate(mu_prompt, LENGTH_SIGMA))
        output = round(rng.lognormvariate(mu_output, LENGTH_SIGMA))
        if min(prompt, output) >= MIN_TOKENS and prompt <= MAX_PROMPT_TOKENS and prompt + output <= MAX_SEQUENCE_TOKENS:
            pairs.append((prompt, output))
    return pairs


async def _complete(session: aiohttp.ClientSession, url: str, model: str, prompt_tokens: int, output: int) -> dict:
    # /v1/completions counts one BOS token plus ceil(len/4) for the text (see gateway.engines.sim.text).
    body = {"model": model, "prompt": text_for_tokens(prompt_tokens - 1), "max_tokens": output, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        payload = await response.json()
        if response.status != 200:
            raise RuntimeError(f"engine answered {response.status}: {payload}")
        return payload["usage"]


async def _stats(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/sim/stats") as response:
        return await response.json()


async def _histogram_mean(session: aiohttp.ClientSession, url: str, name: str) -> tuple[float, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    total = float(re.search(rf"^{re.escape(name)}_sum\{{.*\}} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    count = float(re.search(rf"^{re.escape(name)}_count\{{.*\}} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return total, count


async def run_throughput(setup: ThroughputSetup, url: str, requests: int) -> list[Row]:
    jobs = iter(sample_lengths(random.Random(SEED), setup.mean_prompt_tokens, setup.mean_output_tokens, requests))
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    connector = aiohttp.TCPConnector(limit=setup.batch)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:

        async def client() -> None:
            for prompt, output in jobs:
                result = await _complete(session, url, setup.model, prompt, output)
                usage["prompt_tokens"] += result["prompt_tokens"]
                usage["completion_tokens"] += result["completion_tokens"]

        before = await _stats(session, url)
        await asyncio.gather(*(client() for _ in range(setup.batch)))
        after = await _stats(session, url)
        ttft_sum, ttft_count = await _histogram_mean(session, url, "lmdeploy:time_to_first_token_seconds")
    elapsed_s = after["busy_s"] - before["busy_s"]
    name = f"{setup.model} TP{setup.tp} batch {setup.batch}, {requests} requests"
    rows = [
        Row(name, "requests/s", requests / elapsed_s, setup.requests_per_s),
        Row(name, "output tokens/s", usage["completion_tokens"] / elapsed_s, setup.output_tokens_per_s),
        Row(name, "total tokens/s", (usage["prompt_tokens"] + usage["completion_tokens"]) / elapsed_s,
            setup.total_tokens_per_s),
    ]
    if setup.ttft_s is not None:
        rows.append(Row(name, "first-token latency, mean (s)", ttft_sum / ttft_count, setup.ttft_s))
    return rows


async def run_static(url: str, batch: int, prompt: int, output: int, published: float) -> Row:
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=batch)) as session:
        before = await _stats(session, url)
        usages = await asyncio.gather(*(_complete(session, url, "llama-2-7b", prompt, output) for _ in range(batch)))
        after = await _stats(session, url)
    tokens = sum(u["completion_tokens"] for u in usages)
    elapsed_s = after["busy_s"] - before["busy_s"]
    return Row(f"llama-2-7b TP1 static, in {prompt} / out {output}, batch {batch}", "output tokens/s",
               tokens / elapsed_s, published)


def calibrate(time_scale: float, requests: int) -> list[Row]:
    rows: list[Row] = []
    for setup in THROUGHPUT:
        batch_flag = ("--max-batch-size", str(setup.batch))
        with engine(setup.model, setup.tp, time_scale=time_scale, extra=batch_flag) as (url, _):
            rows += asyncio.run(run_throughput(setup, url, requests))
    for batch, prompt, output, published in STATIC:
        # Short runs at a lower scale keep the event loop's timer granularity out of the figure.
        scale = time_scale if output > 1000 else min(time_scale, 2.0)
        with engine("llama-2-7b", 1, time_scale=scale, extra=("--max-batch-size", str(batch))) as (url, _):
            rows.append(asyncio.run(run_static(url, batch, prompt, output, published)))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = ["| setup | figure | simulated | published | ratio |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.setup} | {row.metric} | {row.simulated:,.3f} | {row.published:,.3f} | {row.ratio:.2f} |")
    return "\n".join(lines)


async def _stream_forever(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, counts: list[int]) -> None:
    body = {"model": "llama-2-7b", "prompt": text_for_tokens(200), "max_tokens": 3000, "ignore_eos": True,
            "stream": True}
    while not stop.is_set():
        async with session.post(f"{url}/v1/completions", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data: {"):
                    counts[0] += 1
                if stop.is_set():
                    break


async def measure_cpu(url: str, pid: int, *, streams: int, window_s: float) -> str:
    counts = [0]
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=streams)
    # The streams take every connection of their session; the control requests get their own.
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session, \
            aiohttp.ClientSession(timeout=TIMEOUT) as control:
        tasks = [asyncio.create_task(_stream_forever(session, url, stop, counts)) for _ in range(streams)]
        running = 0
        for _ in range(60):  # until every stream is admitted and decoding
            await asyncio.sleep(0.5)
            running = (await _stats(control, url))["running"]
            if running == streams:
                break
        cpu_before, events_before, wall_before = _cpu_seconds(pid), counts[0], time.monotonic()
        await asyncio.sleep(window_s)
        cpu_after, events_after, wall_after = _cpu_seconds(pid), counts[0], time.monotonic()
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = wall_after - wall_before
    return (
        f"{running} streams running; engine CPU {100 * (cpu_after - cpu_before) / wall:.1f} % of one core over "
        f"{wall:.1f} s; {(events_after - events_before) / wall:,.0f} SSE chunks/s delivered"
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat (fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-scale", type=float, default=10.0, help="engine time scale (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per throughput setup (default: 3000)")
    parser.add_argument("--cpu", action="store_true", help="measure CPU use of one engine serving 256 streams")
    parser.add_argument("--window", type=float, default=20.0, help="CPU measurement window in seconds")
    args = parser.parse_args()
    if args.cpu:
        with engine("llama-2-7b", 1, time_scale=1.0, extra=("--max-batch-size", "256")) as (url, pid):
            print(asyncio.run(measure_cpu(url, pid, streams=256, window_s=args.window)))
        return 0
    rows = calibrate(args.time_scale, args.requests)
    print(format_rows(rows))
    outside = [row for row in rows if not 0.8 <= row.ratio <= 1.2]
    for row in outside:
        print(f"outside ±20 %: {row.setup}: {row.metric} ratio {row.ratio:.2f}", file=sys.stderr)
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
