"""One trial through the real path: deploy the candidate as its own pool, route a trial route to it, drive the
class's load profile at the gateway, read the window's metrics and the engines' clocks, clean up.

The runner talks to the gateway only through :class:`tuner.control.GatewayControl` and to the load generator
only through a :class:`LoadDriver` (``loadtests.run_load`` by default, run in a worker thread). It never raises
for a property of the configuration: a pool that is refused, cannot be placed, crashes or is not ready in time,
and a load run that fails, come back as a :class:`Measurement` with ``failure`` set; metrics that cannot be read
or clocks that lag come back with ``invalid`` set. Errors of the gateway itself (controller unavailable) and
cancellation propagate.

Timeline of a trial (wall clock): deploy and wait until ready; route; start the load with the tuning warm-up;
when the load generator writes its ``measure`` phase the window starts (metrics mark + engine clocks), and
``window_s`` later it ends (the same again); the load keeps running a little past the end so the window is
steady, then stops. The trial route is removed; the pool is removed too unless pools are kept for reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

from gateway.config import TpgateConfig
from gateway.control.initial_state import engine_spec
from gateway.control.state import POOL_ID_PATTERN, PoolSpec
from loadtests import LoadRunError, LoadTestInputError, Profile, Summary, load_profile, run_load
from loadtests.records import Phase, RecordReader
from tuner.control import GatewayControl, PoolState, pool_failure_reason
from tuner.evaluate import Measurement
from tuner.sources import ClockReader, MetricSource, MetricsUnavailable, SimClockReader
from tuner.space import Candidate
from tuner.timescale import ClockReading, check_clocks, real_clock, wall_profile
from tuner.window import WindowFigures

TAIL_S = 1.0  # load keeps running this long past the window's end, so the window never sees its ramp-down
POLL_S = 0.1
LOAD_STOP_TIMEOUT_S = 15.0  # a cancelled load run stops within a progress interval; then it is abandoned


class LoadDriver(Protocol):
    """Runs a load profile against a host and returns its summary (blocking; ``loadtests.run_load``).
    ``records_path`` receives the per-request records and phases as they happen; ``progress`` gets a line
    every couple of seconds (raising from its ``write`` stops the run)."""

    def __call__(self, profile: Profile, host: str, *, api_key: str | None, records_path: Path,
                 progress: TextIO | None) -> Summary: ...


class _Refused(Exception):
    """The gateway refused a trial pool (StateRejected); the message is its reason."""


class LoadCancelled(Exception):
    """Raised inside the load driver's thread to stop a run whose trial was cancelled."""


def study_key(study_name: str) -> str:
    """Six hex digits naming a study in pool ids and routes."""
    return hashlib.sha256(study_name.encode()).hexdigest()[:6]


def trial_pool_id(study_name: str, candidate: Candidate) -> str:
    """``t-<study>-tp2x2-mbs256-kv8-q0-pf8192``: the same candidate always gets the same pool (reuse)."""
    pool_id = f"t-{study_key(study_name)}-{candidate.slug()}"
    if not POOL_ID_PATTERN.match(pool_id):
        digest = hashlib.sha256(candidate.slug().encode()).hexdigest()[:8]
        pool_id = f"t-{study_key(study_name)}-tp{candidate.tp}x{candidate.replicas}-{digest}"
    return pool_id


def trial_route(study_name: str, number: int) -> str:
    return f"trial-{study_key(study_name)}-{number}"


class TrialRunner:
    """Runs trials of one workload class against one gateway, one at a time."""

    def __init__(
        self,
        *,
        control: GatewayControl,
        config: TpgateConfig,
        class_name: str,
        study_name: str,
        source: MetricSource,
        admin_token: str,
        load_driver: LoadDriver = run_load,
        clock_reader: ClockReader | None = None,
        keep_pools: bool = False,
        poll_s: float = POLL_S,
        tail_s: float = TAIL_S,
    ) -> None:
        """``keep_pools``: leave measured pools running for reuse (evicted when the budget needs the GPUs,
        and all removed by :meth:`close`); otherwise each trial removes its pool."""
        workload_class = config.classes.get(class_name)
        if workload_class is None:
            raise ValueError(f"unknown class {class_name!r}")
        if workload_class.profile is None:
            raise ValueError(f"class {class_name!r} has no load profile (classes.{class_name}.profile)")
        try:
            self.profile = load_profile(workload_class.profile)
        except LoadTestInputError as exc:
            raise ValueError(f"class {class_name!r}: {exc}") from None
        self._control = control
        self._config = config
        self._class_name = class_name
        self._study_name = study_name
        self._source = source
        self._token = admin_token
        self._driver = load_driver
        self._own_clocks: SimClockReader | None = None
        if clock_reader is None:
            clock_reader = self._own_clocks = SimClockReader()
        self._clocks: ClockReader = clock_reader
        self._keep_pools = keep_pools
        self._kept: list[str] = []
        self._poll_s, self._tail_s = poll_s, tail_s
        tuning = config.tuning
        self.warmup_s, self.window_s, self.timeout_s = tuning.warmup_s, tuning.window_s, tuning.trial_timeout_s
        self.max_clock_lag_ratio = tuning.max_clock_lag_ratio

    async def run(self, candidate: Candidate, *, number: int, run: int = 0) -> Measurement:
        """Deploy, measure and clean up one candidate (see the module's docstring). ``run`` > 0 re-measures it
        with another load sequence: the profile's seed plus ``run`` (other prompt lengths, think times and
        arrival order)."""
        pool_id, route = trial_pool_id(self._study_name, candidate), trial_route(self._study_name, number)
        started = time.monotonic()
        timings: dict[str, float] = {}
        stage = "deploying"
        measurement = None
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._deploy(PoolSpec(id=pool_id, replicas=candidate.replicas,
                                            engine=engine_spec(self._config, candidate.tp, candidate.knobs)))
                timings["deploy_s"] = time.monotonic() - started
                stage = "waiting for the pool to be ready"
                pool = await self._control.wait_ready(pool_id, timeout_s=self.timeout_s)
                timings["ready_s"] = time.monotonic() - started
                stage = "routing"
                await self._control.set_route(route, {pool_id: 1.0}, trial_class=self._class_name)
                gateway_url = (await self._control.status()).gateway_url
                await self._source.watch(gateway_url, {pool_id: pool.endpoints})
                stage = "measuring"
                measurement = await self._measure(pool, route, gateway_url, timings, run=run)
        except _Refused as exc:
            measurement = self._failed(pool_id, route, f"the gateway refused the pool: {exc}", timings)
        except TimeoutError:
            what = "not ready" if stage.startswith("waiting") else f"still {stage}"
            measurement = self._failed(pool_id, route, f"{what} after the trial timeout of {self.timeout_s:g} s",
                                       timings)
        except MetricsUnavailable as exc:
            measurement = await self._unreadable(pool_id, route, str(exc), timings)
        except RuntimeError as exc:
            reason = pool_failure_reason(exc)
            if reason is None:
                raise
            measurement = self._failed(pool_id, route, f"pool failed while {stage}: {reason}", timings)
        finally:
            keep = measurement is not None and measurement.failure is None and self._keep_pools
            await self._clean_up(pool_id, route, keep=keep)
        assert measurement is not None  # every path above set it or raised
        return dataclasses.replace(measurement, timings={**measurement.timings,
                                                         "total_s": time.monotonic() - started})

    async def close(self) -> None:
        """Remove the pools kept for reuse; close the engine-clock reader this runner opened."""
        await self._evict()
        if self._own_clocks is not None:
            await self._own_clocks.aclose()

    async def _evict(self) -> None:
        while self._kept:
            await self._remove_pool(self._kept.pop())

    def _failed(self, pool_id: str, route: str, reason: str, timings: Mapping[str, float]) -> Measurement:
        return Measurement(pool_id, route, self._source.name, failure=reason, timings=dict(timings))

    async def _deploy(self, spec: PoolSpec) -> None:
        """Add the pool, reusing one that runs with the same spec; evict kept pools when the budget is short."""
        existing = (await self._control.status()).pools.get(spec.id)
        if existing is not None and _same_spec(existing, spec) and existing.phase != "failed":
            return
        if existing is not None:
            await self._remove_pool(spec.id)
        await self._wait_gone(spec.id)
        try:
            await self._control.add_pool(spec)
            return
        except ValueError as exc:  # StateRejected: the planner or the budget said no
            if not self._kept:
                raise _Refused(str(exc)) from None
        await self._evict()
        try:
            await self._control.add_pool(spec)
        except ValueError as exc:
            raise _Refused(str(exc)) from None

    async def _wait_gone(self, pool_id: str) -> None:
        """Until no pool of this id is draining or being deleted. A pool re-added while it drains takes its old
        replicas back, and when its deployment changes (other GPUs) they still count as its ready replicas until
        they stop: a re-measurement of the configuration a trial has just removed read its clock from an engine
        that had gone a moment later. Bounded by the trial timeout."""
        while pool_id in (await self._control.status()).draining:
            await asyncio.sleep(self._poll_s)

    async def _unreadable(self, pool_id: str, route: str, problem: str, timings: Mapping[str, float]) -> Measurement:
        """Metrics or clocks could not be read: the pool's fault when it is no longer running (its engine
        crashed), else the measurement's (invalid)."""
        pool = (await self._control.status()).pools.get(pool_id)
        if pool is None or pool.phase != "running" or pool.ready_replicas < pool.replicas:
            state = "gone" if pool is None else f"{pool.phase}, {pool.ready_replicas}/{pool.replicas} ready"
            detail = f" {pool.message}" if pool is not None and pool.message else ""
            return self._failed(pool_id, route, f"the pool stopped serving during the trial ({state}){detail}: "
                                f"{problem}", timings)
        return Measurement(pool_id, route, self._source.name, invalid=problem, timings=dict(timings))

    async def _measure(
        self, pool: PoolState, route: str, gateway_url: str, timings: dict[str, float], *, run: int
    ) -> Measurement:
        profile = wall_profile(run_profile(self.profile, run), pool.time_scale, warmup_s=self.warmup_s,
                               duration_s=self.window_s + self._tail_s, route=route)
        progress = _LoadProgress()
        with tempfile.TemporaryDirectory(prefix="tpgate-trial-") as scratch:
            records = Path(scratch) / "records.jsonl"
            load = asyncio.ensure_future(asyncio.to_thread(
                self._driver, profile, gateway_url, api_key=self._token, records_path=records,
                progress=cast(TextIO, progress)))
            try:
                return await self._measure_while_loaded(pool, route, load, RecordReader(records), timings)
            finally:
                if not load.done():
                    progress.cancel()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(load), LOAD_STOP_TIMEOUT_S)

    async def _measure_while_loaded(
        self, pool: PoolState, route: str, load: asyncio.Future[Summary], records: RecordReader,
        timings: dict[str, float],
    ) -> Measurement:
        source = self._source.name
        load_started = time.monotonic()
        while not any(isinstance(e, Phase) and e.phase == "measure" for e in records.read_new()):
            if load.done():
                return Measurement(pool.id, route, source, timings=timings,
                                   failure=f"the load ended before its warm-up did: {_load_outcome(load)}")
            await asyncio.sleep(self._poll_s)
        timings["warmup_s"] = time.monotonic() - load_started
        start, start_clocks = await asyncio.gather(self._source.mark(), self._read_clocks(pool))
        await asyncio.sleep(max(0.0, start.at_s + self.window_s - time.time()))
        end, end_clocks = await asyncio.gather(self._source.mark(), self._read_clocks(pool))
        if load.done():
            return Measurement(pool.id, route, source, timings=timings,
                               failure=f"the load ended inside the window: {_load_outcome(load)}")
        values = await self._source.window_values(start, end, route=route, pool=pool.id)
        try:
            load_summary: dict[str, Any] = (await load).as_dict()
        except (LoadRunError, LoadCancelled) as exc:  # after the window: the window stands
            load_summary = {"error": str(exc).splitlines()[0]}
        timings.update(window_start_unix_s=start.at_s, window_end_unix_s=end.at_s, window_s=end.at_s - start.at_s)
        wall = WindowFigures.from_values(values, window_s=end.at_s - start.at_s)
        clock = real_clock()
        if pool.engine == "sim":
            clock = check_clocks(start_clocks, end_clocks, nominal_scale=pool.time_scale,
                                 tolerance=self.max_clock_lag_ratio)
        if clock.restarted:
            return Measurement(pool.id, route, source, timings=timings, wall=wall, clock=clock, load=load_summary,
                               failure=f"engine restarted during the window: {clock.reason}")
        return Measurement(pool.id, route, source, invalid=None if clock.valid else clock.reason, wall=wall,
                           clock=clock, timings=timings, load=load_summary)

    async def _read_clocks(self, pool: PoolState) -> dict[str, ClockReading]:
        if pool.engine != "sim":
            return {}
        replicas = sorted(pool.endpoints)
        readings = await asyncio.gather(*(self._clocks.read(pool.endpoints[r]) for r in replicas))
        return dict(zip(replicas, readings, strict=True))

    async def _clean_up(self, pool_id: str, route: str, *, keep: bool) -> None:
        with contextlib.suppress(ValueError):  # the route was never set
            await self._control.remove_route(route)
        if keep:
            if pool_id not in self._kept:
                self._kept.append(pool_id)
        else:
            await self._remove_pool(pool_id)

    async def _remove_pool(self, pool_id: str) -> None:
        with contextlib.suppress(ValueError):  # never added, or already gone
            await self._control.remove_pool(pool_id)
        if pool_id in self._kept:
            self._kept.remove(pool_id)


def run_profile(profile: Profile, run: int) -> Profile:
    """The load profile of a configuration's ``run``-th measurement: the same profile with its seed moved by
    ``run``, so each run draws other lengths, think times and prompts (run 0 is the profile itself)."""
    if run < 0:
        raise ValueError(f"run must not be negative, not {run}")
    return profile if run == 0 else profile.model_copy(update={"seed": profile.seed + run})


def _same_spec(pool: PoolState, spec: PoolSpec) -> bool:
    engine = spec.engine
    return (pool.tp, pool.replicas, pool.knobs, pool.engine, pool.time_scale) == (
        engine.tp, spec.replicas, engine.knobs, engine.engine, engine.time_scale)


def _load_outcome(load: asyncio.Future[Summary]) -> str:
    exc = load.exception()
    if isinstance(exc, LoadRunError | LoadTestInputError):
        return str(exc).splitlines()[0]
    if exc is not None:
        return repr(exc)
    summary = load.result()
    return f"{summary.requests} requests, {summary.failures} failed, stopped by {summary.stopped_by}"


class _LoadProgress(io.TextIOBase):
    """The load driver's progress stream: swallows its lines, and stops the run once cancelled (run_load
    writes a line every couple of seconds and stops locust's process group when the write raises)."""

    def __init__(self, sink: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self._sink = sink
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._cancelled.is_set():
            raise LoadCancelled("the trial was cancelled")
        if self._sink is not None and text.strip():
            self._sink(text.strip())
        return len(text)
