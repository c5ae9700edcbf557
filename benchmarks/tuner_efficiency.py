"""How few trials the tuner needs: a tabular benchmark of its whole search strategy.

Measure a class's whole grid once through the real trial path (``tpgate tune``'s runner against a gateway of
its own, simulated engines at ``tuning.sim_time_scale``, optionally with a deviation file), every configuration
``--runs`` times with other load seeds, into a JSON table (``tuner.tabular``); the table is written after every
measurement and the same command continues an interrupted one:

    nice -n 10 .venv/bin/python benchmarks/tuner_efficiency.py --measure benchmarks/grids/h100-internvl2_5-38b.yaml \\
        --class interactive [--deviation benchmarks/grids/deviation-tp-costlier.yaml] [--runs 2] \\
        --out benchmarks/grids/h100-internvl2_5-38b-interactive.json

Replay the tuner's whole strategy (the real study driver: model-guided start, TPE, hidden constraints,
re-measurement) with the table as the measurement, for many seeds, against random search and Optuna's default
sampler alone; one line per setting; exit status 1 when a target that applies to the table is missed:

    .venv/bin/python benchmarks/tuner_efficiency.py --replay benchmarks/grids/X.json --seeds 0-49 [--json out.json]

Print a table's measured figures as the Markdown table docs/tuner.md shows (the grid's best first):

    .venv/bin/python benchmarks/tuner_efficiency.py --markdown benchmarks/grids/X.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

import optuna

from gateway.commands.tune import own_gateway
from gateway.config import load_config
from tuner.grid_measure import grid_meta, measure_grid
from tuner.space import build_space
from tuner.tabular import GridTable, TableError


def parse_seeds(text: str) -> list[int]:
    """``0-49`` or ``7``."""
    low, _, high = text.partition("-")
    seeds = list(range(int(low), int(high or low) + 1))
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def measure(args: argparse.Namespace) -> int:
    deviation = str(Path(args.deviation).resolve()) if args.deviation else None
    config = load_config(args.measure, overrides={"engine.deviation_file": deviation})
    space = build_space(config, args.class_name)
    out = Path(args.out)
    command = shlex.join(["python", "benchmarks/tuner_efficiency.py", *sys.argv[1:]])
    meta = grid_meta(config, space, name=out.stem, runs=args.runs, command=command, config_path=args.measure,
                     deviation_path=args.deviation)
    table = GridTable.load(out) if out.exists() else GridTable(meta)
    if table.meta.get("space") != meta["space"] or table.runs > args.runs:
        raise SystemExit(f"{out} was measured with another space or more runs; write another file")
    if table.runs < args.runs:  # every configuration measured once already: add runs, newest command recorded
        table = table.with_meta(runs=args.runs, command=command)
    if table.complete(space.candidates()):
        print(f"{out}: every configuration has {table.runs} runs already")
        return 0
    try:
        with own_gateway(config) as (handle, study_config):
            table = asyncio.run(measure_grid(study_config, space, handle, table, out=out,
                                             max_attempts=args.max_attempts))
    except KeyboardInterrupt:
        print(f"{out}: interrupted; every finished measurement is kept and the same command continues",
              file=sys.stderr)
        return 130
    missing = len(space.candidates()) * table.runs - sum(len(r.runs) for r in table.rows)
    print(f"{out}: {len(table.rows)} configurations, {missing} runs still missing")
    return 0 if missing == 0 else 1


def replay(args: argparse.Namespace) -> int:
    from tuner.efficiency import Replay, check_targets, describe_prior, format_line, replay_table

    try:
        table = GridTable.load(args.replay)
        configurations = Replay.of(table).configurations
        print(describe_prior(table), flush=True)
        results = replay_table(table, seeds=args.seeds)
    except TableError as exc:
        print(f"tuner_efficiency: {exc}", file=sys.stderr)
        return 2
    for result in results:
        print(format_line(result, configurations))
    misses = check_targets(table, results, configurations)
    for miss in misses:
        print(f"target missed: {miss}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "table": args.replay, "seeds": [args.seeds[0], args.seeds[-1]], "configurations": configurations,
            "prior": describe_prior(table), "settings": [r.as_dict() for r in results], "missed": misses,
        }, indent=1) + "\n")
    return 1 if misses else 0


def markdown(args: argparse.Namespace) -> int:
    from tuner.grid_report import markdown_table

    try:
        print(markdown_table(GridTable.load(args.markdown)))
    except TableError as exc:
        print(f"tuner_efficiency: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--measure", metavar="CONFIG", help="measure a grid: the tpgate configuration of the pair")
    mode.add_argument("--replay", metavar="TABLE", help="replay studies against a measured table")
    mode.add_argument("--markdown", metavar="TABLE", help="print a measured table's figures in Markdown")
    parser.add_argument("--class", dest="class_name", default="interactive", help="--measure: the class")
    parser.add_argument("--deviation", metavar="FILE", help="--measure: the engines' deviation file")
    parser.add_argument("--runs", type=int, default=2, help="--measure: measurements per configuration")
    parser.add_argument("--max-attempts", type=int, default=4, help="--measure: tries of an invalid measurement")
    parser.add_argument("--out", help="--measure: the table (JSON); an existing one is continued")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-49"), help="--replay: e.g. 0-49")
    parser.add_argument("--json", metavar="PATH", help="--replay: write every setting's figures here")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.measure:
        if not args.out:
            parser.error("--measure needs --out")
        return measure(args)
    if args.markdown:
        return markdown(args)
    return replay(args)


if __name__ == "__main__":
    sys.exit(main())
