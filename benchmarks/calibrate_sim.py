"""Calibrate the simulated engine: its figures on the rows the performance model's constants were chosen
against, and its CPU cost.

The fitting rows (``benchmarks/published.py``: LMDeploy's two A100 request-throughput rows and its Llama-2-7B
static-batch curve) are replayed through the engine's own scheduler and cost model on a manual clock, as
``validate_sim.py`` replays the validation rows: ShareGPT-like lengths (``sharegpt.py``) from a closed loop of
clients, the engine settings the benchmark used. ``--cpu`` instead starts a real ``tpgate engine sim`` process
and measures its CPU use while it serves 256 concurrent streams in real time.

    .venv/bin/python benchmarks/calibrate_sim.py [--cpu] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from published import FITTING
from validate_sim import check, format_table

from gateway.engines.sim.text import text_for_tokens

TIMEOUT = aiohttp.ClientTimeout(total=3600)


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


async def _stats(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/sim/stats") as response:
        return dict(await response.json())


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
    parser.add_argument("--seed", type=int, default=1, help="seed of the ShareGPT-like lengths")
    parser.add_argument("--cpu", action="store_true", help="measure CPU use of one engine serving 256 streams")
    parser.add_argument("--window", type=float, default=20.0, help="CPU measurement window in seconds")
    args = parser.parse_args()
    if args.cpu:
        with engine("llama-2-7b", 1, time_scale=1.0, extra=("--max-batch-size", "256")) as (url, pid):
            print(asyncio.run(measure_cpu(url, pid, streams=256, window_s=args.window)))
        return 0
    print(format_table(check(FITTING, seed=args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
