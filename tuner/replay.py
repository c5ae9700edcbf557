"""A cheap synthetic replay of whole studies, to choose the sampler by measurement.

The "truth" is the performance model's prediction bent by a deliberate :class:`Deviation` (all-reduce costlier
than modelled, so large TP sizes lose; prefill slower) plus a little seeded noise per measurement, so the prior
is informative but wrong. Each setting (sampler, with or without the model-guided start) runs the real
:class:`tuner.study.StudyDriver` against a :class:`SyntheticRunner` for many seeds, and reports how many
measured trials it took until the best configuration found was within 5 % of the grid's true optimum.

    python -m tuner.replay --class batch --seeds 0-19 --trials 20
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import TpgateConfig, load_config
from loadtests import load_profile
from tuner.evaluate import Measurement
from tuner.objectives import ObjectiveSpec, objective_specs, slo_results
from tuner.prior import WorkloadShape, predict_figures
from tuner.space import Candidate, SearchSpace, build_space
from tuner.study import SAMPLERS, StudyDriver, StudyOptions
from tuner.timescale import real_clock
from tuner.window import WindowFigures

WITHIN = 0.05
WINDOW_S = 60.0


@dataclass(frozen=True)
class Deviation:
    """How the synthetic truth departs from the model: TPOT factor per TP size (all-reduce), prefill, and a
    cost of large batches the model does not see (TPOT x (1 + f x log2(max_batch_size / 128)))."""

    tpot_factor_by_tp: Mapping[int, float] = field(default_factory=lambda: {1: 1.0, 2: 1.08, 4: 1.25, 8: 1.6})
    prefill_factor: float = 1.3
    batch_tpot_per_doubling: float = 0.0
    noise: float = 0.03  # standard deviation of the multiplicative noise of each measurement


DEVIATIONS = {
    "mild": Deviation(),
    # all-reduce far costlier than modelled and large batches slower: the model's TP order and knob ties mislead
    "adversarial": Deviation(tpot_factor_by_tp={1: 1.0, 2: 1.0, 4: 1.5, 8: 2.4}, batch_tpot_per_doubling=0.12),
}


def true_figures(space: SearchSpace, candidate: Candidate, workload: WorkloadShape,
                 deviation: Deviation) -> dict[str, float]:
    """The synthetic truth of a candidate (engine clock, no noise)."""
    p = predict_figures(space, candidate, workload)
    tpot = deviation.tpot_factor_by_tp.get(candidate.tp, 1.0)
    batch_size = candidate.knobs.max_batch_size or 128
    tpot *= 1 + deviation.batch_tpot_per_doubling * max(0.0, math.log2(batch_size / 128))
    figures = {k: float(v) for k, v in p.items() if v is not None}
    figures["tpot_p50_s"] *= tpot
    figures["tpot_p99_s"] *= tpot
    figures["ttft_p50_s"] *= deviation.prefill_factor
    figures["ttft_p99_s"] *= deviation.prefill_factor
    figures["requests_per_s"] /= tpot
    figures["output_tokens_per_s"] /= tpot
    figures["e2e_p50_s"] = figures["ttft_p50_s"] + (workload.output_mean - 1) * figures["tpot_p50_s"]
    figures["e2e_p99_s"] = figures["ttft_p99_s"] + (workload.output_p99 - 1) * figures["tpot_p99_s"]
    return figures


class SyntheticRunner:
    """A trial runner that deploys nothing: it 'measures' :func:`true_figures` with seeded noise."""

    def __init__(self, space: SearchSpace, workload: WorkloadShape, deviation: Deviation, *, seed: int) -> None:
        self._space, self._workload, self._deviation = space, workload, deviation
        self._rng = random.Random(seed)
        self.deployments = 0

    async def run(self, candidate: Candidate, *, number: int, run: int = 0) -> Measurement:
        """``run`` draws nothing different: every measurement has its own noise already."""
        self.deployments += 1
        truth = true_figures(self._space, candidate, self._workload, self._deviation)
        noisy = {k: v * math.exp(self._rng.gauss(0, self._deviation.noise)) for k, v in truth.items()}
        requests = noisy["requests_per_s"] * WINDOW_S
        wall = WindowFigures(
            clock="wall", window_s=WINDOW_S, requests=requests, errors=0.0, error_rate=0.0,
            requests_per_s=noisy["requests_per_s"], output_tokens_per_s=noisy["output_tokens_per_s"],
            prompt_tokens_per_s=noisy["requests_per_s"] * self._workload.prompt_mean,
            goodput_requests_per_s=noisy["requests_per_s"],
            ttft_p50_s=noisy["ttft_p50_s"], ttft_p90_s=None, ttft_p99_s=noisy["ttft_p99_s"], ttft_mean_s=None,
            tpot_p50_s=noisy["tpot_p50_s"], tpot_p90_s=None, tpot_p99_s=noisy["tpot_p99_s"], tpot_mean_s=None,
            e2e_p50_s=noisy["e2e_p50_s"], e2e_p90_s=None, e2e_p99_s=noisy["e2e_p99_s"], e2e_mean_s=None,
        )
        return Measurement(pool_id=f"synthetic-{number}", route=f"trial-synthetic-{number}", source="synthetic",
                           wall=wall, clock=real_clock())

    async def close(self) -> None:
        """Nothing was deployed."""


def true_optimum(space: SearchSpace, workload: WorkloadShape, deviation: Deviation, spec: ObjectiveSpec,
                 config: TpgateConfig) -> float:
    """The best true objective value among candidates that truly meet every SLO."""
    slo = config.classes[space.class_name].slo
    values = []
    for candidate in space.candidates():
        truth = true_figures(space, candidate, workload, deviation)
        if all(r.met for r in slo_results(slo, truth)):
            values.append(truth[spec.figure])
    if not values:
        raise ValueError("no candidate truly meets the SLOs")
    return min(values) if spec.direction == "minimize" else max(values)


async def replay_one(config: TpgateConfig, class_name: str, *, sampler: str, guided: int, seed: int,
                     trials: int, deviation: Deviation) -> int | None:
    """Measured trials until the best found is within 5 % of the true optimum (None: not within ``trials``)."""
    config = config.model_copy(update={"tuning": config.tuning.model_copy(update={"guided_trials": guided})})
    space = build_space(config, class_name)
    workload_class = config.classes[class_name]
    workload = WorkloadShape.of(load_profile(workload_class.profile or class_name))
    spec = objective_specs(workload_class.objectives)[0]
    optimum = true_optimum(space, workload, deviation, spec, config)
    driver = StudyDriver(
        config=config, space=space, runner=SyntheticRunner(space, workload, deviation, seed=seed),
        options=StudyOptions(storage=None, study_name=f"replay-{sampler}-{seed}", n_trials=trials, seed=seed,
                             sampler=sampler),
        workload=workload, worst_latency_s=300.0,
    )
    result = await driver.run()
    best_true: float | None = None
    for position, record in enumerate((r for r in result.records if r.reused_from is None
                                       and r.outcome != "rejected"), start=1):
        if record.outcome != "feasible":
            continue
        value = true_figures(space, record.candidate, workload, deviation)[spec.figure]
        if best_true is None or spec.better(value, best_true):
            best_true = value
        if best_true is not None and abs(best_true - optimum) <= WITHIN * abs(optimum):
            return position
    return None


def summarize(counts: Sequence[int | None], trials: int) -> dict[str, Any]:
    """Median and p90 of trials-to-within-5 %, counting a miss as ``trials + 1``."""
    filled = sorted(c if c is not None else trials + 1 for c in counts)
    p90 = filled[min(len(filled) - 1, math.ceil(0.9 * len(filled)) - 1)]
    return {"median": statistics.median(filled), "p90": p90, "missed": sum(c is None for c in counts),
            "runs": len(counts)}


def parse_seeds(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="tpgate configuration (default: the embedded default)")
    parser.add_argument("--class", dest="class_name", default="batch")
    parser.add_argument("--seeds", default="0-19")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--deviation", choices=sorted(DEVIATIONS), default="mild")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    space = build_space(config, args.class_name)
    print(f"class {args.class_name}: {len(space.candidates())} feasible candidates, {args.trials} trials, "
          f"seeds {args.seeds}, {args.deviation} deviation")
    for sampler in args.samplers.split(","):
        for guided in (config.tuning.guided_trials, 0):
            started = time.monotonic()
            counts = [asyncio.run(replay_one(config, args.class_name, sampler=sampler, guided=guided, seed=seed,
                                             trials=args.trials, deviation=DEVIATIONS[args.deviation]))
                      for seed in parse_seeds(args.seeds)]
            stats = summarize(counts, args.trials)
            print(f"{sampler:>6} prior {'on ' if guided else 'off'}: trials to within 5 %: median {stats['median']}"
                  f", p90 {stats['p90']}, missed {stats['missed']}/{stats['runs']} "
                  f"({time.monotonic() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
