"""tpgate's tuner: an Optuna study per workload class over pool shapes (TP size x replicas) and engine knobs,
measured through the gateway with the window's metrics read from Prometheus (or direct scrapes).

The public surface:

- :func:`build_space` / :class:`SearchSpace` / :class:`Candidate`: what a class's study may try (the planner's
  rules; a rejected combination is never deployed);
- :func:`tune`: one session against a running gateway (:class:`GatewayHandle` over a :class:`GatewayControl`),
  async and cancellable, resumable from its storage; :class:`StudyResult` holds every :class:`TrialRecord`;
- :class:`StudyDriver`, :class:`TrialRunner`, :class:`PrometheusSource`, :class:`ScrapeSource` and
  :class:`PrometheusServer`: the parts :func:`tune` assembles, for callers that assemble their own;
- :func:`winner_yaml`: the winner as a configuration ``tpgate serve --config`` accepts.

The HTML report is :func:`tuner.report.write_report` (it imports plotly, so it is not imported here).
"""

from tuner.control import GatewayControl, GatewayFactory, GatewayHandle
from tuner.prometheus_server import PrometheusServer
from tuner.records import TrialRecord
from tuner.runner import TrialRunner
from tuner.session import tune
from tuner.sources import MetricSource, PrometheusSource, ScrapeSource
from tuner.space import Candidate, SearchSpace, build_space
from tuner.study import StudyDriver, StudyOptions, StudyResult
from tuner.winner import winner_yaml

__all__ = [
    "Candidate",
    "GatewayControl",
    "GatewayFactory",
    "GatewayHandle",
    "MetricSource",
    "PrometheusServer",
    "PrometheusSource",
    "ScrapeSource",
    "SearchSpace",
    "StudyDriver",
    "StudyOptions",
    "StudyResult",
    "TrialRecord",
    "TrialRunner",
    "build_space",
    "tune",
    "winner_yaml",
]
