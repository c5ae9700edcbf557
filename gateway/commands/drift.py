"""Watch a running gateway for drift: classes whose live traffic no longer looks like what they were tuned for.

``tpgate drift --config FILE`` runs the drift monitor against the gateway until Ctrl-C or
``--duration``: every ``drift.interval_s`` it reads the classes ``drift.classes`` lists, from the gateway's
``/metrics`` or with ``--prometheus-url`` from Prometheus, prints a line whenever a class drifts, clears, or what a
re-tune would do changes, keeps the references and verdicts in ``drift.reference_file``, and serves the
``tpgate_class_drifted`` gauges on ``--metrics-port`` (loopback). With the admin token (``auth.admin_token_file``)
it reads the gateway's free GPUs and running studies from ``/admin/status``, sends every verdict to
``PUT /admin/drift/{class}`` (the gateway's state, gauge and events), and re-tunes a class in mode ``auto`` through
the admin API (an online study on its live profile, the judge, a staged promotion).

The tuner is imported only when the monitor runs (``gateway`` never imports ``tuner`` at import time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from gateway.commands.load import parse_duration_s
from gateway.config import TpgateConfig, load_config
from gateway.errors import UserError

DEFAULT_GATEWAY = "http://127.0.0.1:8000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="tpgate YAML configuration with a drift section")
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, metavar="URL",
                        help=f"the gateway to watch (default {DEFAULT_GATEWAY})")
    parser.add_argument("--prometheus-url", metavar="URL", help="read the intervals from this Prometheus")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve the monitor's metrics on 127.0.0.1:PORT/metrics")
    parser.add_argument("--duration", type=lambda text: parse_duration_s(text, flag="--duration"),
                        help="stop after this long (default: until Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, environ=os.environ)
    watched = [name for name, c in config.drift.classes.items() if c.mode != "off"]
    if not watched:
        raise UserError("no class to watch: list classes under drift.classes with mode advisory or auto "
                        "(deploy/tpgate.example.yaml shows how)")
    return asyncio.run(_watch(config, args))


async def _watch(config: TpgateConfig, args: argparse.Namespace) -> int:
    from aiohttp import web

    from tuner.admin_http import AdminHttp
    from tuner.drift_monitor import AdminApiFacts, DriftMonitor, FactsSource, PromqlIntervals, ScrapeIntervals
    from tuner.drift_store import FileDriftStore
    from tuner.guard_rails import smallest_pool_gpus
    from tuner.retune import Retuner

    reader = (PromqlIntervals(args.prometheus_url, config.drift.interval_s) if args.prometheus_url
              else ScrapeIntervals(args.gateway))
    facts: FactsSource | None = None
    admin: AdminHttp | None = None
    retuner: Retuner | None = None
    token_path = Path(config.auth.admin_token_file).expanduser()
    if token_path.is_file():
        admin = AdminHttp(args.gateway, token_path.read_text().strip())
        facts = AdminApiFacts(admin)
        retuner = Retuner(config, admin, say=_say)
    else:
        _say(f"no admin token at {token_path}: free GPUs and running studies are unknown, so no re-tune is advised")
    monitor = DriftMonitor(config, reader=reader, store=FileDriftStore(config.drift.reference_file),
                           min_pool_gpus=smallest_pool_gpus(config), facts=facts, gateway=admin, retuner=retuner,
                           say=_say)
    automatic = [name for name in monitor.classes if config.drift.classes[name].mode == "auto"]
    _say(f"watching {', '.join(monitor.classes)} every {config.drift.interval_s:g} s through "
         f"{reader.description}; " + (f"re-tuning {', '.join(automatic)} by itself (mode auto)"
                                      if automatic and retuner is not None else "advisory: nothing is changed"))
    runner = None
    if args.metrics_port is not None:
        app = web.Application()

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=monitor.metrics.exposition(), content_type="text/plain")

        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.metrics_port).start()
        _say(f"metrics on http://127.0.0.1:{args.metrics_port}/metrics")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.duration is not None:
        loop.call_later(args.duration, stop.set)
    try:
        await monitor.start()
        await monitor.run(stop)
    finally:
        await monitor.aclose()
        await reader.aclose()
        if admin is not None:
            await admin.aclose()
        if runner is not None:
            await runner.cleanup()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):
                loop.remove_signal_handler(signum)
    return 0


def _say(line: str) -> None:
    print(f"tpgate drift: {line}", file=sys.stderr, flush=True)
