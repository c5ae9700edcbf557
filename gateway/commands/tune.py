"""Tune a workload class: measure pool configurations through the gateway and write the winner.

``tpgate tune --class CLASS`` runs (or resumes) an Optuna study: each trial deploys one configuration as its own
pool on a trial route, drives the class's load profile at it, and reads the window's metrics from Prometheus.
Progress goes to stderr, one line per trial; the winner is printed and written with ``--out`` as a
configuration ``tpgate serve --config`` accepts; ``--json`` keeps every trial. Ctrl-C stops cleanly; the same
command resumes. ``tpgate tune report`` renders a study as a self-contained HTML page.

The tuner is imported only when a study runs (``gateway`` never imports ``tuner`` at import time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.commands.load import parse_duration_s
from gateway.config import ConfigError, TpgateConfig, load_config
from gateway.errors import UserError

if TYPE_CHECKING:
    from tuner import GatewayFactory, GatewayHandle, StudyResult

DEFAULT_STORAGE_FILE = "~/.tpgate/tune.db"
DEFAULT_TRIALS = 10


def _parse_timeout_s(text: str) -> float:
    return parse_duration_s(text, flag="--timeout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class", dest="class_name", metavar="CLASS", help="the workload class to tune")
    parser.add_argument("--config", help="tpgate YAML configuration (default: the embedded default)")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                        help=f"measured trials in the study, earlier runs included (default {DEFAULT_TRIALS})")
    parser.add_argument("--timeout", type=_parse_timeout_s, help="stop starting trials after this, e.g. 20m")
    parser.add_argument("--storage", metavar="URL",
                        help=f"Optuna storage URL (default: sqlite:///{DEFAULT_STORAGE_FILE})")
    parser.add_argument("--study-name", metavar="NAME",
                        help="default: <class>-<hash of the class's search space and targets>")
    parser.add_argument("--seed", type=int, help="sampler seed")
    parser.add_argument("--prometheus-url", metavar="URL",
                        help="read metrics from this Prometheus (default: start one)")
    parser.add_argument("--out", metavar="PATH", help="write the winner here as a tpgate configuration (YAML)")
    parser.add_argument("--json", metavar="PATH", help="write every trial's record here")
    verbs = parser.add_subparsers(dest="verb", metavar="{report}")
    report = verbs.add_parser("report", help="render a study as a self-contained HTML page",
                              description="Render a study as a self-contained HTML page (plots need no network).")
    report.add_argument("--storage", dest="report_storage", required=True, metavar="URL", help="Optuna storage URL")
    report.add_argument("--study-name", dest="report_study_name", metavar="NAME",
                        help="needed when the storage holds several")
    report.add_argument("--out", dest="report_out", required=True, metavar="PATH", help="the HTML file to write")


def run(args: argparse.Namespace, *, gateway_factory: GatewayFactory | None = None) -> int:
    """``gateway_factory`` starts the gateway the study runs against (tests and the admin API pass theirs)."""
    if args.verb == "report":
        return _report(args)
    config, class_name = validated(args)
    storage = args.storage or _default_storage()
    try:
        if gateway_factory is not None:
            result = asyncio.run(_tune(config, class_name, args, storage=storage, factory=gateway_factory))
        else:
            with own_gateway(config) as (handle, study_config):
                result = asyncio.run(_tune(study_config, class_name, args, storage=storage,
                                           factory=_given(handle)))
    except KeyboardInterrupt:
        print(f"\ntpgate tune: interrupted; the study is saved in {storage}: run the same command to resume",
              file=sys.stderr)
        return 130
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return _report_winner(config, result, out=args.out)


def validated(args: argparse.Namespace) -> tuple[TpgateConfig, str]:
    """The configuration and class, checked before anything starts (UserError naming the problem)."""
    if not args.class_name:
        raise UserError("tpgate tune: --class is required (or use `tpgate tune report`)")
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, not {args.trials}")
    config = load_config(args.config, environ=os.environ, overrides={"tuning.prometheus_url": args.prometheus_url},
                         flag_names={"tuning.prometheus_url": "--prometheus-url"})
    from tuner import build_space  # validates the class, its budget and the space

    build_space(config, args.class_name)
    if config.classes[args.class_name].profile is None:
        raise UserError(f"class {args.class_name!r} has no load profile to tune with (classes.{args.class_name}."
                        "profile)")
    return config, args.class_name


@contextlib.contextmanager
def own_gateway(config: TpgateConfig) -> Iterator[tuple[GatewayHandle, TpgateConfig]]:
    """A gateway of the study's own, as ``tpgate serve`` starts one but with no production pools or routes (the
    whole GPU budget is the study's), on a free loopback port and a state file of its own, stopped at the end.
    Yields it with the configuration it runs (simulated engines at ``tuning.sim_time_scale``)."""
    from gateway.cluster.lifecycle import running_gateway
    from gateway.cluster.procutil import free_loopback_port
    from gateway.cluster.runtime import resolve_api_keys
    from gateway.control.state import DesiredState
    from tuner import GatewayHandle

    with tempfile.TemporaryDirectory(prefix="tpgate-tune-") as scratch:
        engine = config.engine
        if engine.kind == "sim":  # an offline study on simulated engines runs their clocks faster
            engine = engine.model_copy(update={"time_scale": config.tuning.sim_time_scale})
        own = config.model_copy(update={
            "engine": engine,
            "state_file": str(Path(scratch) / "state.json"),
            "server": config.server.model_copy(update={"host": "127.0.0.1", "port": free_loopback_port()}),
        })
        with running_gateway(own, initial=DesiredState(), reset_state=True, tuning_service=False,
                             api_key_classes=resolve_api_keys(own, os.environ), say=_say) as gateway:
            _say(f"a gateway of its own on {gateway.url} ({own.gpus} x {own.gpu}, {own.engine.kind} engines)")
            yield GatewayHandle(control=gateway.client, admin_token=gateway.admin_token), own


def _given(handle: GatewayHandle) -> GatewayFactory:
    @contextlib.asynccontextmanager
    async def factory(config: TpgateConfig) -> AsyncIterator[GatewayHandle]:
        yield handle

    return factory


def _say(line: str) -> None:
    print(f"tpgate tune: {line}", file=sys.stderr, flush=True)


async def _tune(config: TpgateConfig, class_name: str, args: argparse.Namespace, *, storage: str,
                factory: GatewayFactory) -> StudyResult:
    import optuna

    from tuner import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours; Optuna's would double it

    def progress(line: str) -> None:
        print(f"tpgate tune: {line}", file=sys.stderr, flush=True)

    async with factory(config) as gateway:
        return await tune(config, class_name, gateway=gateway, storage=storage, study_name=args.study_name,
                          n_trials=args.trials, timeout_s=args.timeout, seed=args.seed, progress=progress)


def _report_winner(config: TpgateConfig, result: StudyResult, *, out: str | None) -> int:
    from tuner import winner_yaml

    print(f"study {result.study_name}: {result.measured_trials} measured trials ({result.source})")
    if not result.best:
        print(f"no configuration met every SLO of class {result.class_name!r}; see the trials above, or "
              f"`tpgate tune report --storage {result.storage} --study-name {result.study_name} --out report.html`")
        return 1
    for record in result.best:
        print(f"winner: #{record.number} {record.candidate.label()}")
    if out is not None:
        text = winner_yaml(config, result.class_name, result.best[0].candidate, study_name=result.study_name)
        Path(out).write_text(text)
        try:
            load_config(out)
        except ConfigError as exc:
            raise UserError(f"{out}: the winner does not make a valid configuration: {exc}") from None
        print(f"wrote {out}: tpgate serve --config {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tuner.report import write_report

    report = write_report(args.report_storage, args.report_study_name, args.report_out)
    print(f"wrote {args.report_out}: {len(report.records)} trials of study {report.study_name}")
    return 0


def _default_storage() -> str:
    from tuner.session import sqlite_storage

    return sqlite_storage(DEFAULT_STORAGE_FILE)
