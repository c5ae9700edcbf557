"""One tuning session against a running gateway: pick the metric source, build the space on the GPUs free, run
the study. This is what ``tpgate tune`` calls once its gateway is up, and what a running gateway calls to tune
on the GPUs its production pools leave free.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from gateway.config import TpgateConfig
from gateway.errors import UserError
from loadtests import load_profile, run_load
from tuner.control import GatewayHandle
from tuner.prior import WorkloadShape
from tuner.prometheus_server import ManagedPrometheusSource, PrometheusServer
from tuner.runner import LoadDriver, TrialRunner
from tuner.sources import ClockReader, MetricSource, PrometheusSource, ScrapeSource
from tuner.space import Candidate, build_space
from tuner.study import StudyDriver, StudyOptions, StudyResult, default_study_name

PROMETHEUS_BINARY = "prometheus"


@contextlib.asynccontextmanager
async def open_metric_source(
    *, prometheus_url: str | None, router_metrics_urls: tuple[str, ...] = (), binary: str = PROMETHEUS_BINARY,
    progress: Callable[[str], None] = lambda line: None,
) -> AsyncIterator[MetricSource]:
    """A Prometheus server's API when ``prometheus_url`` is given; otherwise a Prometheus server started on
    loopback for the session when the binary is installed; otherwise direct scrapes (said in ``progress``)."""
    async with contextlib.AsyncExitStack() as stack:
        source: MetricSource
        if prometheus_url is not None:
            source = PrometheusSource(prometheus_url)
        elif shutil.which(binary) is None:
            progress(f"metrics: no {binary!r} on PATH and no --prometheus-url: reading the gateway's /metrics "
                     "directly at each window's start and end (Debian: apt-get install -y prometheus)")
            source = ScrapeSource(router_metrics_urls)
        else:
            server = await stack.enter_async_context(PrometheusServer(binary=binary))
            source = ManagedPrometheusSource(server, router_metrics_urls=router_metrics_urls)
        stack.push_async_callback(source.aclose)
        yield source


async def tune(
    config: TpgateConfig,
    class_name: str,
    *,
    gateway: GatewayHandle,
    storage: str | None,
    study_name: str | None = None,
    n_trials: int,
    timeout_s: float | None = None,
    seed: int | None = None,
    sampler: str = "tpe",
    load_driver: LoadDriver = run_load,
    clock_reader: ClockReader | None = None,
    progress: Callable[[str], None] = lambda line: None,
    first: Sequence[Candidate] = (),
) -> StudyResult:
    """Run (or resume) the study of ``class_name`` on the GPUs the gateway has free; cancellable.

    Metrics come from ``tuning.prometheus_url``, else a Prometheus server started for the session, else direct
    scrapes; ``clock_reader`` reads simulated engines' clocks (default: their ``/sim/stats``); ``first``:
    configurations measured before the model's picks."""
    status = await gateway.control.status()
    space = build_space(config, class_name, gpus_free=status.gpus_free)
    profile_name = config.classes[class_name].profile
    if profile_name is None:
        raise UserError(f"class {class_name!r} has no load profile (classes.{class_name}.profile)")
    profile = load_profile(profile_name)
    name = study_name or default_study_name(config, space)
    options = StudyOptions(storage=storage, study_name=name, n_trials=n_trials, timeout_s=timeout_s, seed=seed,
                           sampler=sampler)
    progress(f"study {name!r} in {storage or 'memory'}: class {class_name!r} on up to {space.gpus} GPUs, "
             f"{len(space.candidates())} configurations the planner accepts (TP sizes {list(space.tp_sizes)})")
    async with open_metric_source(prometheus_url=config.tuning.prometheus_url, progress=progress,
                                  router_metrics_urls=gateway.router_metrics_urls) as source:
        progress(f"metrics: {source.description}")
        runner = TrialRunner(
            control=gateway.control, config=config, class_name=class_name, study_name=name, source=source,
            admin_token=gateway.admin_token, load_driver=load_driver, clock_reader=clock_reader,
        )
        driver = StudyDriver(
            config=config, space=space, runner=runner, options=options, workload=WorkloadShape.of(profile),
            worst_latency_s=profile.request_timeout_s, progress=progress, source=source.description, first=first,
        )
        return await driver.run()


def sqlite_storage(path: str | Path) -> str:
    """The SQLAlchemy URL of a SQLite file (its directory is created)."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"
