"""Each router's part in promotions: report its series of the classes under promotion to the controller, and
keep the ``tpgate_promotion_step``, ``tpgate_promotion_weight_ratio`` and ``tpgate_class_drifted`` gauges of this
router's ``/metrics``.

About once a second the router sends the controller the ``tpgate_`` series of the classes the controller asked
for at the last report (nothing when no promotion runs) and is told which classes to send next time and each
promotion's step, and the drift monitor's current verdict per class. A controller that does not answer
(restarting) is asked again at the next period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from gateway.control.metric_reports import REPORTED_METRICS
from gateway.dataplane.metrics import GatewayMetrics
from gateway.exposition import Samples

logger = logging.getLogger("tpgate.router")

REPORT_PERIOD_S = 1.0


class MetricsSink(Protocol):
    async def report_metrics(self, router_id: str, samples: Any) -> dict[str, Any]: ...


def collect(metrics: GatewayMetrics, classes: set[str]) -> Samples:
    """This router's series a promotion window reads, of ``classes`` only."""
    if not classes:
        return {}
    samples: Samples = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name in REPORTED_METRICS and sample.labels.get("class") in classes:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


class MetricsReporter:
    """The report loop of one router replica (an asyncio task between :meth:`start` and :meth:`stop`)."""

    def __init__(self, metrics: GatewayMetrics, sink: MetricsSink, *, period_s: float = REPORT_PERIOD_S) -> None:
        self._metrics = metrics
        self._sink = sink
        self._period_s = period_s
        self.router_id = "router-" + uuid.uuid4().hex[:12]
        self._classes: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def report_once(self) -> None:
        answer = await self._sink.report_metrics(self.router_id, collect(self._metrics, self._classes))
        self._classes = set(answer.get("classes", ()))
        self._publish(answer.get("steps", {}), answer.get("drifted", {}))

    def _publish(self, steps: Mapping[str, Mapping[str, float]], drifted: Mapping[str, int]) -> None:
        m = self._metrics
        m.promotion_step.clear()
        m.promotion_weight.clear()
        for class_name, step in steps.items():
            m.promotion_step.labels(class_name).set(step["step"])
            m.promotion_weight.labels(class_name).set(step["weight"])
        m.class_drifted.clear()
        for class_name, value in drifted.items():
            m.class_drifted.labels(class_name).set(value)

    async def _run(self) -> None:
        while True:
            try:
                await self.report_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the controller restarting must not stop the router; report again later
                logger.warning("metrics report to the controller failed: %s", exc)
            await asyncio.sleep(self._period_s)
