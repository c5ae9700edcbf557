"""Measure a class's whole grid through the real trial path, for the tabular benchmark (:mod:`tuner.tabular`).

Every configuration of the class's search space is measured ``runs`` times by the :class:`~tuner.runner.TrialRunner`
``tpgate tune`` uses, against a gateway of its own (simulated engines at ``tuning.sim_time_scale``, with the
configuration's deviation file), run ``n`` with the load profile's seed plus ``n``: one pass over the grid per
run, each pass in its own shuffled order so that a machine getting busier or quieter does not favour one part
of the grid. A measurement whose engine clock lagged beyond ``tuning.max_clock_lag_ratio`` is invalid: it is
measured again (up to ``max_attempts`` times), and only its reason is kept. The table is written after every
measurement, and a rerun with the same output file continues where the last one stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import TpgateConfig
from gateway.engines.sim.config import load_deviation
from loadtests import load_profile
from tuner.control import GatewayHandle
from tuner.evaluate import TrialContext, TrialJudge
from tuner.objectives import objective_specs
from tuner.prior import WorkloadShape, predict_figures
from tuner.records import TrialRecord
from tuner.runner import TrialRunner
from tuner.session import open_metric_source
from tuner.space import Candidate, SearchSpace
from tuner.tabular import GridRow, GridTable

RETRY_PAUSE_S = 20.0  # after an invalid measurement, let a busy machine settle before measuring again


def grid_meta(config: TpgateConfig, space: SearchSpace, *, name: str, runs: int, command: str,
              config_path: str, deviation_path: str | None) -> dict[str, Any]:
    """What a table records about how it was measured (everything but the rows and the timings)."""
    workload_class = config.classes[space.class_name]
    deviation = None
    if deviation_path is not None:
        deviation = {k: dict(v) if isinstance(v, Mapping) else v
                     for k, v in dataclasses.asdict(load_deviation(deviation_path)).items()}
    tuning = config.tuning
    return {
        "name": name,
        "model": config.model,
        "gpu": config.gpu,
        "gpus": space.gpus,
        "class": space.class_name,
        "objectives": list(workload_class.objectives),
        "slo": workload_class.slo.model_dump(),
        "profile": workload_class.profile,
        "space": space.describe(),
        "configurations": len(space.candidates()),
        "runs": runs,
        "engine": {"kind": config.engine.kind, "time_scale": tuning.sim_time_scale,
                   "deviation_file": deviation_path, "deviation": deviation},
        "measuring": {"warmup_s": tuning.warmup_s, "window_s": tuning.window_s,
                      "max_clock_lag_ratio": tuning.max_clock_lag_ratio, "trial_timeout_s": tuning.trial_timeout_s},
        "config": config_path,
        "command": command,
        "sessions": [],
    }


async def measure_grid(
    config: TpgateConfig,
    space: SearchSpace,
    gateway: GatewayHandle,
    table: GridTable,
    *,
    out: Path,
    max_attempts: int = 4,
    say: Callable[[str], None] = print,
) -> GridTable:
    """Measure every (configuration, run) the table lacks; returns the table as written to ``out``."""
    class_name = space.class_name
    workload_class = config.classes[class_name]
    profile = load_profile(workload_class.profile or class_name)
    workload = WorkloadShape.of(profile)
    judge = TrialJudge(objective_specs(workload_class.objectives), workload_class.slo, profile.request_timeout_s)
    candidates = space.candidates()
    todo = [(candidate, run) for run in range(table.runs)
            for candidate in _shuffled(candidates, f"{table.name}:{run}")
            if len(_runs_of(table, candidate)) <= run]
    earlier = list(table.meta.get("sessions", ()))
    session: dict[str, Any] = {"started": _now(), "host_cpus": os.cpu_count(),
                               "load_average_start": os.getloadavg()[0], "measurements": 0, "invalid": 0}
    say(f"{table.name}: {len(candidates)} configurations x {table.runs} runs, {len(todo)} measurements to go")
    started = time.monotonic()
    async with open_metric_source(prometheus_url=config.tuning.prometheus_url, progress=say,
                                  router_metrics_urls=gateway.router_metrics_urls) as source:
        session["source"] = source.description
        runner = TrialRunner(control=gateway.control, config=config, class_name=class_name,
                             study_name=f"grid-{table.name}", source=source, admin_token=gateway.admin_token)
        try:
            for position, (candidate, run) in enumerate(todo, start=1):
                record, invalid, spent_s = await _measure_one(
                    runner, judge, space, candidate, run=run, workload=workload, max_attempts=max_attempts,
                    number=len(table.rows) * table.runs + position, say=say)
                session["measurements"] += 1 + len(invalid)
                session["invalid"] += len(invalid)
                table = _with_run(table, candidate, record, invalid, spent_s)
                table = table.with_meta(sessions=[*earlier, {**session, "wall_s": time.monotonic() - started,
                                                              "finished": _now(),
                                                              "load_average_end": os.getloadavg()[0]}])
                table.save(out)
                say(f"[{position}/{len(todo)}] {_summary(record)}  ({spent_s:.0f} s"
                    + (f", {len(invalid)} invalid before" if invalid else "") + ")")
        finally:
            await runner.close()
    return table


async def _measure_one(
    runner: TrialRunner, judge: TrialJudge, space: SearchSpace, candidate: Candidate, *, run: int,
    workload: WorkloadShape, max_attempts: int, number: int, say: Callable[[str], None],
) -> tuple[TrialRecord | None, list[str], float]:
    """One run of a configuration, measured again while invalid; (None, reasons, s) when it never was valid."""
    verdict = space.verdict(candidate)
    context = TrialContext(
        number=number, candidate=candidate, run=run, predicted=predict_figures(space, candidate, workload),
        planner={"weights_per_gpu_bytes": float(verdict.weights_per_gpu_bytes),
                 "kv_cache_bytes_per_gpu": float(verdict.kv_cache_bytes_per_gpu),
                 "kv_cache_tokens_per_replica": float(verdict.kv_cache_tokens_per_replica)})
    invalid: list[str] = []
    started = time.monotonic()
    for attempt in range(max_attempts):
        measurement = await runner.run(candidate, number=number, run=run)
        record = judge.judge(context, measurement)
        if record.outcome != "invalid":
            return record, invalid, time.monotonic() - started
        invalid.append(record.reason or "invalid")
        say(f"    {candidate.label()} run {run}: invalid ({record.reason}); attempt {attempt + 1} of {max_attempts}")
        await asyncio.sleep(RETRY_PAUSE_S)
    return None, invalid, time.monotonic() - started


def _with_run(table: GridTable, candidate: Candidate, record: TrialRecord | None, invalid: list[str],
              spent_s: float) -> GridTable:
    existing = [r for r in table.rows if r.candidate == candidate]
    row = existing[0] if existing else GridRow(candidate, ())
    runs = row.runs if record is None else (*row.runs, record)
    return table.with_row(GridRow(candidate, runs, (*row.invalid, *invalid), row.measuring_s + spent_s))


def _runs_of(table: GridTable, candidate: Candidate) -> tuple[TrialRecord, ...]:
    found = [r for r in table.rows if r.candidate == candidate]
    return found[0].runs if found else ()


def _shuffled(candidates: list[Candidate], seed: str) -> list[Candidate]:
    order = list(candidates)
    random.Random(seed).shuffle(order)
    return order


def _summary(record: TrialRecord | None) -> str:
    if record is None:
        return "never valid"
    parts = [f"{record.candidate.label()} run {record.run}: {record.outcome}"]
    if record.measured is not None:
        m = record.measured
        figures = (("e2e p99", m.e2e_p99_s, 1, "s"), ("TTFT p99", m.ttft_p99_s, 1, "s"),
                   ("TPOT p99", m.tpot_p99_s, 1000, "ms"))
        latencies = [f"{label} {value * scale:.3g} {unit}" for label, value, scale, unit in figures
                     if value is not None]  # unstreamed requests have no TTFT or TPOT
        parts.append(", ".join([*latencies, f"{m.output_tokens_per_s:,.0f} tok/s", f"{m.requests:.0f} requests"]))
    if record.clock is not None:
        parts.append(f"clock {record.clock.effective_scale:.3g}x (lag {record.clock.lag_ratio:+.1%})")
    if record.reason and record.outcome != "feasible":
        parts.append(f"({record.reason})")
    return "  ".join(parts)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
