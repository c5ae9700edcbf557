"""Fakes of the gateway's control client, a metric source, engine clocks and the load generator, with the
shapes the real ones document (errors included)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from gateway.config import load_config
from gateway.control.state import PoolSpec
from gateway.planner import EngineKnobs
from loadtests import Profile, Summary, load_profile
from loadtests.records import Phase, RecordWriter
from loadtests.summary import summarize
from tuner.evaluate import TrialContext, TrialJudge
from tuner.grid_measure import grid_meta
from tuner.objectives import objective_specs
from tuner.prior import WorkloadShape, predict_figures
from tuner.replay import Deviation, SyntheticRunner
from tuner.sources import WindowMark
from tuner.space import build_space
from tuner.tabular import GridRow, GridTable
from tuner.timescale import ClockReading


class StateRejected(ValueError):
    """As gateway.control.client.StateRejected: the planner or the budget refused; message = reason."""


class PoolFailed(RuntimeError):
    """As gateway.control.client.PoolFailed."""

    def __init__(self, pool_id: str, reason: str) -> None:
        super().__init__(f"pool {pool_id}: {reason}")
        self.pool_id, self.reason = pool_id, reason


class ControllerUnavailable(RuntimeError):
    """As gateway.control.client.ControllerUnavailable."""


@dataclass(frozen=True)
class FakePool:
    id: str
    tp: int
    replicas: int
    ready_replicas: int
    gpus: int
    phase: str
    message: str
    endpoints: Mapping[str, str]
    knobs: EngineKnobs
    engine: str
    time_scale: float


@dataclass(frozen=True)
class FakeStatus:
    version: int
    pools: Mapping[str, FakePool]
    routes: Mapping[str, Mapping[str, float]]
    gpus_budget: int
    gpus_used: int
    gpus_free: int
    gateway_url: str = "http://127.0.0.1:18000"
    draining: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class FakeControl:
    """An in-memory controller: pools, routes, a GPU budget; ``on_ready`` decides what wait_ready does."""

    budget: int = 8
    classes: tuple[str, ...] = ("interactive", "batch")
    on_ready: Callable[[str], None] | None = None
    gateway_url: str = "http://127.0.0.1:18000"
    engine_url: str | None = None  # every replica's endpoint (default: a distinct unused port per replica)
    pools: dict[str, FakePool] = field(default_factory=dict)
    routes: dict[str, dict[str, float]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    version: int = 0
    drain_reads: int = 0  # a removed pool stays draining for this many status reads
    draining: dict[str, int] = field(default_factory=dict)  # pool id -> status reads left

    async def status(self) -> FakeStatus:
        used = sum(p.gpus for p in self.pools.values())
        draining = {pool_id: {"phase": "draining"} for pool_id in self.draining}
        self.draining = {pool_id: left - 1 for pool_id, left in self.draining.items() if left > 1}
        return FakeStatus(self.version, dict(self.pools), {k: dict(v) for k, v in self.routes.items()},
                          self.budget, used, self.budget - used, self.gateway_url, draining)

    async def add_pool(self, pool: PoolSpec) -> int:
        self.calls.append(("add_pool", pool.id))
        if pool.id in self.draining:
            self.calls.append(("re-added while draining", pool.id))
        used = sum(p.gpus for p in self.pools.values() if p.id != pool.id)
        if used + pool.gpus > self.budget:
            raise StateRejected(f"pools need {used + pool.gpus} GPUs, more than the budget of {self.budget}")
        self.pools[pool.id] = FakePool(pool.id, pool.tp, pool.replicas, 0, pool.gpus, "deploying", "", {},
                                       pool.engine.knobs, pool.engine.engine, pool.engine.time_scale)
        return self._bump()

    async def remove_pool(self, pool_id: str) -> int:
        self.calls.append(("remove_pool", pool_id))
        if pool_id not in self.pools:
            raise StateRejected(f"unknown pool {pool_id!r}")
        del self.pools[pool_id]
        if self.drain_reads:
            self.draining[pool_id] = self.drain_reads
        for weights in self.routes.values():
            weights.pop(pool_id, None)
        return self._bump()

    async def set_route(self, route: str, weights: Mapping[str, float], *, trial_class: str | None = None) -> int:
        self.calls.append(("set_route", route))
        if route not in self.classes and not route.startswith("trial-"):
            raise StateRejected(f"route {route!r} is neither a workload class nor a trial route")
        self.routes[route] = dict(weights)
        return self._bump()

    async def remove_route(self, route: str) -> int:
        self.calls.append(("remove_route", route))
        if route not in self.routes or not route.startswith("trial-"):
            raise StateRejected(f"no trial route {route!r}")
        del self.routes[route]
        return self._bump()

    async def wait_ready(self, pool_id: str, *, timeout_s: float) -> FakePool:
        self.calls.append(("wait_ready", pool_id))
        if self.on_ready is not None:
            self.on_ready(pool_id)
        pool = self.pools[pool_id]
        endpoints = {f"{pool_id}-r{i}": self.engine_url or f"http://127.0.0.1:{19000 + i}"
                     for i in range(pool.replicas)}
        self.pools[pool_id] = replace(pool, phase="running", ready_replicas=pool.replicas, endpoints=endpoints)
        return self.pools[pool_id]

    def _bump(self) -> int:
        self.version += 1
        return self.version


WINDOW_VALUES = {
    "requests": 100.0, "ok_requests": 99.0, "output_tokens": 15000.0, "prompt_tokens": 50000.0,
    "slo_met_requests": 95.0,
    "ttft_count": 99.0, "ttft_sum": 1.5, "ttft_p50": 0.012, "ttft_p90": 0.02, "ttft_p99": 0.03,
    "tpot_count": 99.0, "tpot_sum": 0.2, "tpot_p50": 0.002, "tpot_p90": 0.0025, "tpot_p99": 0.003,
    "e2e_count": 99.0, "e2e_sum": 30.0, "e2e_p50": 0.3, "e2e_p90": 0.4, "e2e_p99": 0.5,
}


@dataclass
class FakeSource:
    """A metric source whose window always holds :data:`WINDOW_VALUES`."""

    name: str = "scrape"
    description: str = "fake metrics"
    values: Mapping[str, float | None] = field(default_factory=lambda: dict(WINDOW_VALUES))
    watched: list[tuple[str, dict[str, dict[str, str]]]] = field(default_factory=list)
    windows: list[tuple[str, str, float]] = field(default_factory=list)

    async def watch(self, gateway_url: str, engines: Mapping[str, Mapping[str, str]]) -> None:
        self.watched.append((gateway_url, {p: dict(e) for p, e in engines.items()}))

    async def mark(self) -> WindowMark:
        return WindowMark(at_s=time.time())

    async def window_values(self, start: WindowMark, end: WindowMark, *, route: str, pool: str
                            ) -> Mapping[str, float | None]:
        self.windows.append((route, pool, end.at_s - start.at_s))
        return self.values

    async def aclose(self) -> None:
        """Nothing to release."""


class FakeClocks:
    """Engine clocks that run ``scale`` (per URL, else ``default``) simulated seconds per wall second."""

    def __init__(self, default: float, **by_port: float) -> None:
        self._default, self._by_port, self._origin = default, by_port, time.monotonic()

    async def read(self, base_url: str) -> ClockReading:
        scale = self._by_port.get(base_url.rsplit(":", 1)[1], self._default)
        now = time.monotonic()
        return ClockReading(wall_s=now, simulated_s=(now - self._origin) * scale)


@dataclass
class FakeLoad:
    """A load generator: writes its ``measure`` phase after ``warmup_s`` (wall), then writes a progress line
    every few milliseconds until the profile's duration is over, or ``fail`` (an exception) before the phase."""

    fail: Exception | None = None
    runs: list[tuple[Profile, str, str | None]] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __call__(self, profile: Profile, host: str, *, api_key: str | None, records_path: Path,
                 progress: TextIO | None) -> Summary:
        self.runs.append((profile, host, api_key))
        if self.fail is not None:
            raise self.fail
        writer = RecordWriter(records_path.open("a"))
        deadline = time.monotonic() + profile.warmup_s + profile.duration_s
        time.sleep(profile.warmup_s)
        writer.write(Phase("measure", time.time()))
        try:
            while time.monotonic() < deadline:
                if progress is not None:
                    print("[ 0.0s] measuring", file=progress, flush=True)
                time.sleep(0.01)
        except Exception:
            self.cancelled.set()
            raise
        finally:
            writer.close()
        return summarize([], profile=profile.name, host=host)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@dataclass
class ScriptedRunner:
    """A trial runner over another one (usually the synthetic replay's): ``fail`` and ``invalid`` map a
    candidate's TP size to a reason; ``cancel_at`` cancels the n-th run (1-based), as Ctrl-C does."""

    inner: Any
    fail: Mapping[int, str] = field(default_factory=dict)
    invalid: Mapping[int, str] = field(default_factory=dict)
    cancel_at: int | None = None
    runs: list[Any] = field(default_factory=list)
    run_numbers: list[int] = field(default_factory=list)  # the ``run`` of each call
    closed: int = 0

    async def run(self, candidate: Any, *, number: int, run: int = 0) -> Any:
        self.runs.append(candidate)
        self.run_numbers.append(run)
        if self.cancel_at == len(self.runs):
            raise asyncio.CancelledError
        measurement = await self.inner.run(candidate, number=number, run=run)
        if candidate.tp in self.fail:
            return replace(measurement, failure=self.fail[candidate.tp], wall=None, clock=None)
        if candidate.tp in self.invalid:
            return replace(measurement, invalid=self.invalid[candidate.tp])
        return measurement

    async def close(self) -> None:
        self.closed += 1


GRID_CONFIG = """\
model: internvl2_5-38b
gpu: h100-80gb
gpus: 8
default_class: interactive
classes:
  interactive:
    objective: min_e2e_p99
    slo: {ttft_p99_s: 2.0, tpot_p99_s: 0.060}
    profile: interactive
    gpu_budget: 4
tuning:
  knobs:
    max_batch_size: [1, 64]
    cache_max_entry_count: [0.9]
    quant_policy: [0]
    max_prefill_token_num: [8192]
"""


def synthetic_table(directory: Path, *, runs: int = 2, noise: float = 0.02, deviation_file: str | None = None,
                    skip: int = 0) -> GridTable:
    """A grid table of a small InternVL2.5-38B interactive space (4 GPUs, 6 configurations), every run
    measured by the synthetic replay's runner (seed = run) and judged as a study would; ``skip`` leaves that
    many configurations out (a partly measured grid). The configuration is written to ``directory``."""
    path = directory / "grid.yaml"
    path.write_text(GRID_CONFIG)
    config = load_config(str(path))
    space = build_space(config, "interactive")
    profile = load_profile("interactive")
    workload = WorkloadShape.of(profile)
    workload_class = config.classes["interactive"]
    judge = TrialJudge(objective_specs(workload_class.objectives), workload_class.slo, profile.request_timeout_s)
    meta = grid_meta(config, space, name="synthetic", runs=runs, command="test", config_path=str(path),
                     deviation_path=deviation_file)
    rows = []
    for number, candidate in enumerate(space.candidates()[skip:]):
        records = []
        for run in range(runs):
            runner = SyntheticRunner(space, workload, Deviation(noise=noise), seed=number * 100 + run)
            measurement = asyncio.run(runner.run(candidate, number=number, run=run))
            context = TrialContext(number=number, candidate=candidate, run=run,
                                   predicted=predict_figures(space, candidate, workload))
            records.append(judge.judge(context, measurement))
        rows.append(GridRow(candidate, tuple(records), measuring_s=1.0))
    return GridTable(meta, tuple(rows))
