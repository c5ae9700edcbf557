"""Record a workload class's live traffic as a load profile that `tpgate load --profile` replays.

``tpgate profile --class batch --window 30m --prometheus-url URL`` asks Prometheus for the class's last 30
minutes; without ``--prometheus-url`` there is no history to ask, so it measures the *next* window (default 60 s)
from the gateway's own ``/metrics``: a scrape at its start and its end, and the requests in flight every
``--sample-interval``. The YAML goes to ``--out`` (or stdout), the figures it was made from to stderr.
``--set-reference`` also records the profile as the class's drift reference (``drift.reference_file``).

The tuner's arithmetic is imported only when the command runs (``gateway`` never imports ``tuner`` at import time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.commands.load import parse_duration_s
from gateway.config import load_config
from gateway.errors import UserError

if TYPE_CHECKING:
    from tuner.live_profile import LiveProfile

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
DEFAULT_WINDOW_PROMETHEUS_S = 30 * 60.0
DEFAULT_WINDOW_SCRAPE_S = 60.0
DEFAULT_SAMPLE_INTERVAL_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class", dest="class_name", required=True, metavar="CLASS", help="the workload class")
    parser.add_argument("--window", type=lambda text: parse_duration_s(text, flag="--window"),
                        help="with --prometheus-url: the last 30m by default; without: the next 60s by default")
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, metavar="URL",
                        help=f"the gateway whose /metrics to read (default {DEFAULT_GATEWAY})")
    parser.add_argument("--prometheus-url", metavar="URL", help="a Prometheus that scrapes the gateway")
    parser.add_argument("--sample-interval", type=lambda text: parse_duration_s(text, flag="--sample-interval"),
                        default=DEFAULT_SAMPLE_INTERVAL_S, help="without Prometheus: read the gateway this often")
    parser.add_argument("--config", help="tpgate YAML configuration (for --set-reference and to check the class)")
    parser.add_argument("--out", metavar="PATH", help="write the load profile here (default: stdout)")
    parser.add_argument("--set-reference", action="store_true",
                        help="also record it as the class's drift reference (drift.reference_file)")


def run(args: argparse.Namespace) -> int:
    from tuner.profile_fit import ProfileFitError, describe, load_profile_yaml

    config = load_config(args.config, environ=os.environ)
    if args.config and args.class_name not in config.classes:
        raise UserError(f"--class {args.class_name!r} is not a class of {args.config} ({', '.join(config.classes)})")
    live = asyncio.run(_measure(args))
    _say(describe(live))
    try:
        text = load_profile_yaml(live)
    except ProfileFitError as exc:
        print(f"tpgate profile: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(text)
        _say(f"wrote {args.out}: tpgate load --profile {args.out} --host {args.gateway}")
    else:
        sys.stdout.write(text)
    if args.set_reference:
        asyncio.run(_set_reference(live, config.drift.reference_file))
    return 0


async def _measure(args: argparse.Namespace) -> LiveProfile:
    from tuner.drift_monitor import query_live_profile
    from tuner.live_profile import from_scrapes
    from tuner.sources import MetricsUnavailable, PrometheusSource, ScrapeSource

    try:
        if args.prometheus_url:
            window_s = args.window or DEFAULT_WINDOW_PROMETHEUS_S
            prometheus = PrometheusSource(args.prometheus_url)
            _say(f"class {args.class_name}: the last {window_s:g} s from {prometheus.description}")
            try:
                return await query_live_profile(prometheus, args.class_name, window_s)
            finally:
                await prometheus.aclose()
        window_s = args.window or DEFAULT_WINDOW_SCRAPE_S
        source = ScrapeSource()
        await source.watch(args.gateway, {})
        _say(f"no Prometheus given: measuring the next {window_s:g} s of class {args.class_name} from "
             f"{args.gateway.rstrip('/')}/metrics (requests in flight every {args.sample_interval:g} s)")
        try:
            scrapes = []
            deadline = time.monotonic() + window_s
            while True:
                mark = await source.mark()
                scrapes.append((mark.at_s, mark.scrapes))
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    break
                await asyncio.sleep(min(args.sample_interval, left_s))
        finally:
            await source.aclose()
        return from_scrapes(args.class_name, scrapes)
    except MetricsUnavailable as exc:
        raise UserError(f"tpgate profile: {exc}") from None


async def _set_reference(live: LiveProfile, reference_file: str) -> None:
    from tuner.drift import ReferenceProfile
    from tuner.drift_store import FileDriftStore

    store = FileDriftStore(reference_file)
    records = await store.load()
    records.references[live.class_name] = ReferenceProfile.from_live(live, source="tpgate profile --set-reference")
    await store.save(records)
    _say(f"class {live.class_name}: drift reference set in {store.path}")


def _say(line: str) -> None:
    print(f"tpgate profile: {line}", file=sys.stderr, flush=True)
