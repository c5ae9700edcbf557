"""Check the simulated engine against published serving figures (``benchmarks/published.py``).

Every row is replayed through the engine's own scheduler and cost model on a manual clock
(:mod:`gateway.engines.sim.replay`): the benchmark's request pattern (ShareGPT-like lengths from a closed loop
of clients, or static batches), the engine settings the benchmark used, no HTTP. Figures are in simulated
seconds, as the running engine reports them. Prints the fitting rows and the validation rows as two Markdown
tables; exits 1 when a validation row is off by more than ``--tolerance``.

    .venv/bin/python benchmarks/validate_sim.py [--rows fitting|validation|all] [--tolerance 0.15] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from published import EXTRA_MODELS, FITTING, FTL, OUTPUT, RPS, VALIDATION, EngineSetup, Row, ShareGptRun, StaticRun
from sharegpt import sharegpt_lengths

from gateway.engines.sim.batch import BatchLimits
from gateway.engines.sim.replay import ReplayResult, replay_closed_loop
from gateway.planner import EngineKnobs, ModelSpec, evaluate_tp, find_gpu, load_model
from gateway.planner.model import model_from_config
from gateway.planner.perf import KV_BLOCK_TOKENS, StepCostModel


@dataclass(frozen=True)
class Checked:
    row: Row
    simulated: float

    @property
    def error(self) -> float:
        return self.simulated / self.row.published - 1


def model_spec(name: str) -> ModelSpec:
    if name in EXTRA_MODELS:
        return model_from_config(EXTRA_MODELS[name], name=name)
    return load_model(name)


def engine_parts(setup: EngineSetup) -> tuple[StepCostModel, BatchLimits]:
    """The cost model and batch limits of the engine a row describes."""
    model, gpu = model_spec(setup.model), find_gpu(setup.gpu)
    if setup.kv_blocks is not None:
        blocks, block_tokens = setup.kv_blocks, setup.block_tokens
    else:
        knobs = EngineKnobs(cache_max_entry_count=setup.cache_max_entry_count, quant_policy=setup.quant_policy,
                            session_len=setup.session_len)
        verdict = evaluate_tp(model, gpu, setup.tp, gpus=setup.tp, gpus_per_node=setup.tp, knobs=knobs)
        if not verdict.feasible:
            raise SystemExit(f"{setup.describe()}: {verdict.reason}")
        blocks, block_tokens = verdict.kv_cache_tokens_per_replica // KV_BLOCK_TOKENS, KV_BLOCK_TOKENS
    limits = BatchLimits.turbomind(
        max_batch_size=setup.max_batch_size, kv_cache_blocks=blocks,
        max_prefill_token_num=setup.max_prefill_token_num, session_len=setup.session_len, tp=setup.tp,
        block_tokens=block_tokens,
    )
    return StepCostModel(model, gpu, setup.tp, quant_policy=setup.quant_policy), limits


def replay(setup: EngineSetup, run: ShareGptRun | StaticRun, *, seed: int) -> ReplayResult:
    cost, limits = engine_parts(setup)
    if isinstance(run, StaticRun):
        lengths = [(run.prompt_tokens, run.output_tokens)] * (run.batch * run.rounds)
        return replay_closed_loop(cost, limits, lengths, concurrency=run.batch)
    pairs = sharegpt_lengths(run.requests, seed=seed, prompt_mean=run.means[0], output_mean=run.means[1])
    return replay_closed_loop(cost, limits, pairs, concurrency=run.concurrency)


def figure(result: ReplayResult, name: str) -> float:
    return {RPS: result.requests_per_s, OUTPUT: result.output_tokens_per_s, FTL: result.mean_ttft_s}[name]


def check(rows: tuple[Row, ...], *, seed: int) -> list[Checked]:
    results: dict[tuple[EngineSetup, ShareGptRun | StaticRun], ReplayResult] = {}
    checked = []
    for row in rows:
        key = (row.setup, row.run)
        if key not in results:
            results[key] = replay(row.setup, row.run, seed=seed)
        checked.append(Checked(row, figure(results[key], row.figure)))
    return checked


def format_table(checked: list[Checked]) -> str:
    lines = ["| source | setup | run | figure | published | simulated | error | note |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for item in checked:
        row = item.row
        lines.append(
            f"| {row.source} | {row.setup.describe()} | {row.run.describe()} | {row.figure} | {row.published:,.3f} "
            f"| {item.simulated:,.3f} | {item.error:+.1%} | {row.note} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", choices=("fitting", "validation", "all"), default="all")
    parser.add_argument("--tolerance", type=float, default=0.15, help="largest error of a validation row")
    parser.add_argument("--seed", type=int, default=1, help="seed of the ShareGPT-like lengths")
    args = parser.parse_args()
    start = time.monotonic()
    outside: list[Checked] = []
    if args.rows in ("fitting", "all"):
        print("Fitting rows (the constants were chosen against these)\n")
        print(format_table(check(FITTING, seed=args.seed)))
        print()
    if args.rows in ("validation", "all"):
        validation = check(VALIDATION, seed=args.seed)
        print("Validation rows (none of these set a constant)\n")
        print(format_table(validation))
        outside = [item for item in validation if abs(item.error) > args.tolerance]
        within = len(validation) - len(outside)
        print(f"\n{within} of {len(validation)} validation rows within ±{args.tolerance:.0%}")
    print(f"replayed in {time.monotonic() - start:.0f} s", file=sys.stderr)
    for item in outside:
        print(f"outside ±{args.tolerance:.0%}: {item.row.setup.describe()}, {item.row.run.describe()}: "
              f"{item.row.figure} {item.error:+.1%}", file=sys.stderr)
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
