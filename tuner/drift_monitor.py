"""The drift monitor: every ``drift.interval_s`` it reads each watched class's live profile over the last interval,
feeds the class's :class:`~tuner.drift.DriftDetector`, asks the guard rails what a re-tune would do, reports, and —
for a class in mode ``auto``, given a :class:`~tuner.retune.Retuner` — re-tunes.

Reports: the ``tpgate_class_drifted``, ``tpgate_class_drift_ratio`` and ``tpgate_class_retune_advised`` gauges
(:class:`gateway.dataplane.metrics.DriftMetrics`), a line when a class's state or the decision changes, the
verdict in the class's drift record, and — given the gateway's admin API — the whole verdict to the gateway every
interval (its state, ``tpgate_class_drifted`` gauge and ``drift.*`` / ``retune.*`` events come from there).
``advisory`` reports the decision only. ``auto`` with a retuner runs the re-tune (a study on the live profile,
the judge, a staged promotion) as a task of its own, records its time when it starts (``min_retune_interval_s``
counts from it), and after a promotion makes the live profile the class's new reference; without a retuner
``auto`` reports like ``advisory``.

Each class's reference is its stored one, else the load profile it is configured (and tuned) with, else its
first interval with traffic — stored in either of the last two cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp

from gateway.config import DriftClassConfig, TpgateConfig
from gateway.control.client import parse_status
from gateway.dataplane.metrics import DriftMetrics
from loadtests.errors import LoadTestInputError
from loadtests.profile import load_profile
from tuner.admin_http import AdminCallFailed, AdminHttp
from tuner.drift import DriftDetector, DriftVerdict, ReferenceProfile, figure
from tuner.drift_store import DriftRecords, DriftStore
from tuner.guard_rails import RetuneDecision, RetuneFacts, decide
from tuner.live_profile import LiveProfile, from_promql, from_scrapes, promql_queries
from tuner.retune import RetuneOutcome, Retuner
from tuner.retune_advice import predicted_gain
from tuner.sources import MetricsUnavailable, PrometheusSource, ScrapeSource, WindowMark
from tuner.space import Candidate

logger = logging.getLogger("tpgate.drift")

STATUS_TIMEOUT_S = 10.0
VERDICT_VALID_INTERVALS = 3  # the gateway shows a verdict as stale after this many intervals without a new one


class IntervalReader(Protocol):
    """The live profiles of the last interval, per class (None when there is no interval yet: the first read)."""

    @property
    def description(self) -> str: ...

    async def read(self, class_names: Sequence[str]) -> dict[str, LiveProfile] | None: ...

    async def sample(self) -> None:
        """A reading inside the interval (the requests in flight), where the reader needs one."""
        ...

    async def aclose(self) -> None: ...


class ScrapeIntervals:
    """Direct scrapes of the gateway's ``/metrics``: the interval runs from the previous read's scrape to this
    read's; the scrapes of :meth:`sample` in between add readings of the requests in flight."""

    def __init__(self, gateway_url: str, metrics_urls: Sequence[str] = ()) -> None:
        self._gateway_url = gateway_url
        self._source = ScrapeSource(metrics_urls)
        self._marks: list[WindowMark] = []

    @property
    def description(self) -> str:
        return self._source.description

    async def read(self, class_names: Sequence[str]) -> dict[str, LiveProfile] | None:
        await self._source.watch(self._gateway_url, {})
        self._marks.append(await self._source.mark())
        marks, self._marks = self._marks, self._marks[-1:]
        if len(marks) < 2:
            return None
        scrapes = [(mark.at_s, mark.scrapes) for mark in marks]
        return {name: from_scrapes(name, scrapes) for name in class_names}

    async def sample(self) -> None:
        if self._marks:  # before the first read there is no interval to sample
            self._marks.append(await self._source.mark())

    async def aclose(self) -> None:
        await self._source.aclose()


class PromqlIntervals:
    """PromQL over the last ``interval_s`` at each read."""

    def __init__(self, prometheus_url: str, interval_s: float) -> None:
        self._source = PrometheusSource(prometheus_url)
        self._interval_s = interval_s

    @property
    def description(self) -> str:
        return self._source.description

    async def read(self, class_names: Sequence[str]) -> dict[str, LiveProfile] | None:
        return {name: await query_live_profile(self._source, name, self._interval_s) for name in class_names}

    async def sample(self) -> None:
        """Prometheus samples the requests in flight itself."""

    async def aclose(self) -> None:
        await self._source.aclose()


async def query_live_profile(source: PrometheusSource, class_name: str, window_s: float,
                             *, end_s: float | None = None) -> LiveProfile:
    """One class's live profile over ``window_s`` ending at ``end_s`` (now), from Prometheus."""
    at_s = time.time() if end_s is None else end_s
    queries = promql_queries(class_name, window_s)
    results = await asyncio.gather(*(source.query(expr, at_s=at_s) for expr in queries.values()))
    return from_promql(class_name, window_s, at_s, dict(zip(queries, results, strict=True)))


@dataclass(frozen=True)
class GatewayFacts:
    """What the rails need from the gateway: free GPUs, per class what change of it is in progress, and per class
    its current configuration (the pool with the largest share of its route)."""

    free_gpus: int
    in_progress: Mapping[str, str]
    current: Mapping[str, Candidate] = field(default_factory=dict)


class FactsSource(Protocol):
    async def facts(self) -> GatewayFacts: ...


class AdminStatusFacts:
    """``GET /admin/status`` of the gateway (the controller's status, with the admin token): free GPUs, and a
    study of a class running (a trial route of that class)."""

    def __init__(self, gateway_url: str, admin_token: str) -> None:
        self._url = gateway_url.rstrip("/") + "/admin/status"
        self._headers = {"Authorization": f"Bearer {admin_token}"}

    async def facts(self) -> GatewayFacts:
        timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.get(self._url, headers=self._headers) as response:
                if response.status != 200:
                    raise MetricsUnavailable(f"{self._url}: HTTP {response.status}")
                status = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MetricsUnavailable(f"{self._url}: {exc!r}") from None
        return facts_from_status(status)


def facts_from_status(raw: Mapping[str, Any]) -> GatewayFacts:
    """From the controller's status: its free GPUs, the classes a study is tuning (their trial routes), and each
    class's main pool as a configuration."""
    status = parse_status(raw)
    in_progress = {class_name: f"a study of class {class_name} (trial route {route})"
                   for route, class_name in status.trial_classes.items()}
    current = {}
    for route, weights in status.routes.items():
        main = max(weights, key=lambda pool_id: weights[pool_id], default=None)
        pool = status.pools.get(main) if main is not None else None
        if pool is not None:
            current[route] = Candidate(pool.tp, pool.replicas, pool.knobs)
    return GatewayFacts(free_gpus=status.gpus_free, in_progress=in_progress, current=current)


class AdminApiFacts:
    """The gateway's status and its promotions through the admin API: free GPUs, a study or an active promotion
    of a class in progress, and each class's current configuration."""

    def __init__(self, admin: AdminHttp) -> None:
        self._admin = admin

    async def facts(self) -> GatewayFacts:
        try:
            status, promotions = await asyncio.gather(self._admin.status(), self._admin.promotions())
        except AdminCallFailed as exc:
            raise MetricsUnavailable(str(exc)) from None
        facts = facts_from_status(status)
        in_progress = dict(facts.in_progress)
        for promotion in promotions:
            if promotion["phase"] not in ("succeeded", "rolled_back"):
                in_progress.setdefault(str(promotion["class"]),
                                       f"promotion {promotion['id']} ({promotion['phase']})")
        return GatewayFacts(free_gpus=facts.free_gpus, in_progress=in_progress, current=facts.current)


class DriftSink(Protocol):
    """Where each class's verdict goes every interval: the gateway's ``PUT /admin/drift/{class}``
    (:class:`tuner.admin_http.AdminHttp`), which keeps it for ``GET /admin/state``, its ``tpgate_class_drifted``
    gauge and its events."""

    async def report_drift(self, class_name: str, report: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True)
class DriftReport:
    verdict: DriftVerdict
    decision: RetuneDecision


class DriftMonitor:
    """Watches the classes ``config.drift`` lists with a mode other than ``off``. Not thread-safe: one task."""

    def __init__(
        self,
        config: TpgateConfig,
        *,
        reader: IntervalReader,
        store: DriftStore,
        min_pool_gpus: int,
        metrics: DriftMetrics | None = None,
        facts: FactsSource | None = None,
        gateway: DriftSink | None = None,
        retuner: Retuner | None = None,
        say: Callable[[str], None] = logger.info,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._classes = {name: c for name, c in config.drift.classes.items() if c.mode != "off"}
        self._reader = reader
        self._store = store
        self._min_pool_gpus = min_pool_gpus
        self.metrics = metrics or DriftMetrics()
        self._facts = facts
        self._gateway = gateway
        self._sent: dict[str, dict[str, Any]] = {}  # per class, the verdict last sent to the gateway
        self._retune_ended: dict[str, dict[str, Any]] = {}  # per class, how its latest re-tune ended
        self._retuner = retuner
        self._retunes: dict[str, asyncio.Task[RetuneOutcome | None]] = {}  # per class, its re-tune while it runs
        self.outcomes: list[tuple[str, RetuneOutcome]] = []  # every re-tune that ended, with its class
        self._say = say
        self._clock = clock
        self._records = DriftRecords()
        self._detectors: dict[str, DriftDetector] = {}
        self._last_said: dict[str, tuple[bool, str, tuple[str, ...]]] = {}
        self._predictions: dict[str, str] = {}  # per class, the model's prediction since the advice began

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    async def start(self) -> None:
        """Load the drift records and set each class's reference (see the module's description)."""
        self._records = await self._store.load()
        changed = False
        for name, class_config in self._classes.items():
            reference = self._records.references.get(name) or self._configured_reference(name)
            if reference is not None:
                changed |= name not in self._records.references
                self._records.references[name] = reference
                self._detectors[name] = DriftDetector(class_config, reference)
                self._say(f"class {name}: reference {_describe_reference(reference)}")
            else:
                self._say(f"class {name}: no reference yet; its first interval with traffic becomes it")
        if changed:
            await self._store.save(self._records)

    def _configured_reference(self, name: str) -> ReferenceProfile | None:
        profile_name = self._config.classes[name].profile
        if profile_name is None:
            return None
        try:
            profile = load_profile(profile_name)
        except LoadTestInputError as exc:
            self._say(f"class {name}: its load profile cannot be read ({exc}); waiting for traffic instead")
            return None
        return ReferenceProfile.from_load_profile(name, profile, set_at_s=self._clock())

    async def step(self) -> list[DriftReport]:
        """Read one interval and report on every watched class (nothing on the first read: no interval yet)."""
        intervals = await self._reader.read(self.classes)
        if intervals is None:
            return []
        facts, facts_problem = await self._gateway_facts()
        reports, changed = [], False
        for name, live in intervals.items():
            detector = self._detectors.get(name)
            if detector is None:
                if live.arrivals <= 0:
                    continue
                reference = ReferenceProfile.from_live(live, source="first interval observed")
                detector = self._detectors[name] = DriftDetector(self._classes[name], reference)
                self._records.references[name] = reference
                self._say(f"class {name}: reference {_describe_reference(reference)}")
                changed = True
            verdict = detector.observe(live)
            decision = self._with_prediction(name, live, self._decide(name, verdict, facts, facts_problem), facts)
            record = {"drifted": verdict.drifted, "reason": verdict.reason, "decision": decision.action,
                      "decision_reason": decision.reason}
            previous = {k: v for k, v in self._records.verdicts.get(name, {}).items() if k != "at_s"}
            changed |= previous != record  # kept whenever what it says changes, not every interval
            self._records.verdicts[name] = {"at_s": verdict.at_s, **record}
            reports.append(DriftReport(verdict, decision))
            await self._report(verdict, decision, live)
            if decision.action == "retune" and facts is not None:
                changed |= self._start_retune(name, live, decision, facts)
        if changed:
            await self._store.save(self._records)
        return reports

    async def run(self, stop: asyncio.Event) -> None:
        """Steps every ``drift.interval_s``, sampling every ``drift.sample_s`` in between, until ``stop`` is set; a
        failed read is said and tried again at the next step."""
        interval_s, sample_s = self._config.drift.interval_s, self._config.drift.sample_s
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            next_step = loop.time() + interval_s
            try:
                await self.step()
            except MetricsUnavailable as exc:
                self._say(f"metrics unavailable, trying again in {interval_s:g} s: {exc}")
            while not stop.is_set() and (left_s := next_step - loop.time()) > 0:
                try:
                    await asyncio.wait_for(stop.wait(), min(sample_s, left_s))
                except TimeoutError:
                    if next_step - loop.time() > 0:
                        await self._sample()

    async def aclose(self) -> None:
        """Cancel the re-tunes still running (their study and promotion go on in the gateway)."""
        for task in self._retunes.values():
            task.cancel()
        for task in list(self._retunes.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._retunes.clear()

    def _start_retune(self, name: str, live: LiveProfile, decision: RetuneDecision, facts: GatewayFacts) -> bool:
        """Start the class's re-tune as a task; True when the records changed (the re-tune's time)."""
        current = facts.current.get(name)
        if self._retuner is None or current is None or name in self._retunes:
            return False
        self._records.last_retune_s[name] = self._clock()
        self._retunes[name] = asyncio.get_running_loop().create_task(
            self._retune(self._retuner, name, live, decision.gpus, current))
        return True

    async def _retune(self, retuner: Retuner, name: str, live: LiveProfile, gpus: int,
                      current: Candidate) -> RetuneOutcome | None:
        try:
            outcome = await retuner.retune(name, live, gpus=gpus, current=current)
        except AdminCallFailed as exc:
            outcome = RetuneOutcome("failed", str(exc))
        finally:
            self._retunes.pop(name, None)
        self.outcomes.append((name, outcome))
        self._say(f"class {name}: re-tune {outcome.result}: {outcome.reason}")
        self._records.last_retune_s[name] = self._clock()
        if outcome.result == "promoted":
            reference = ReferenceProfile.from_live(
                live, source=f"re-tune study {outcome.study_id} promoted {outcome.winner}")
            self._records.references[name] = reference
            self._detectors[name] = DriftDetector(self._classes[name], reference)
            self._say(f"class {name}: new reference {_describe_reference(reference)}")
        await self._store.save(self._records)
        self._retune_ended[name] = {"result": outcome.result, "reason": outcome.reason, "study": outcome.study_id,
                                    "promotion": outcome.promotion_id, "ended_unix_s": self._clock()}
        if name in self._sent:  # the gateway hears of it now, not at the next interval
            await self._send(name, {**self._sent[name], "retune": self._retune_ended[name]})
        return outcome

    async def _sample(self) -> None:
        try:
            await self._reader.sample()
        except MetricsUnavailable as exc:  # one reading less; the next step says so if it persists
            logger.debug("sample failed: %s", exc)

    async def _gateway_facts(self) -> tuple[GatewayFacts | None, str]:
        if self._facts is None:
            return None, "the gateway's status is not read (no admin token)"
        try:
            return await self._facts.facts(), ""
        except MetricsUnavailable as exc:
            return None, f"the gateway's status is unavailable: {exc}"

    def _decide(self, name: str, verdict: DriftVerdict, facts: GatewayFacts | None,
                facts_problem: str) -> RetuneDecision:
        config: DriftClassConfig = self._classes[name]
        if facts is None and verdict.drifted and config.mode != "off":
            return RetuneDecision("hold", facts_problem)
        last = self._records.last_retune_s.get(name)
        in_progress = f"a re-tune of class {name}" if name in self._retunes else None
        if in_progress is None and facts is not None:
            in_progress = facts.in_progress.get(name)
        decision = decide(RetuneFacts(
            drifted=verdict.drifted, drift_reason=verdict.reason,
            since_last_retune_s=None if last is None else self._clock() - last,
            in_progress=in_progress,
            free_gpus=0 if facts is None else facts.free_gpus, min_pool_gpus=self._min_pool_gpus,
        ), config)
        if decision.action == "retune" and self._retuner is None:  # re-tuning needs the admin API
            return RetuneDecision("advise", decision.reason.replace("re-tune", "would re-tune", 1)
                                  + " (mode auto: re-tuning needs the gateway's admin token)", decision.gpus)
        return decision

    def _with_prediction(self, name: str, live: LiveProfile, decision: RetuneDecision,
                         facts: GatewayFacts | None) -> RetuneDecision:
        """An advice says what the performance model predicts a re-tune would gain (worked out once per advice)."""
        if decision.action != "advise":
            self._predictions.pop(name, None)
            return decision
        if name not in self._predictions:
            current = facts.current.get(name) if facts is not None else None
            gain = None if current is None else predicted_gain(self._config, name, live, current, gpus=decision.gpus)
            self._predictions[name] = "" if gain is None else f"; {gain.describe()}"
        return RetuneDecision(decision.action, decision.reason + self._predictions[name], decision.gpus)

    async def _report(self, verdict: DriftVerdict, decision: RetuneDecision, live: LiveProfile) -> None:
        name = verdict.class_name
        m = self.metrics
        m.drifted.labels(name).set(1 if verdict.drifted else 0)
        m.retune_advised.labels(name).set(1 if decision.action != "hold" else 0)
        for distance in verdict.latest:
            if distance.ratio is not None:
                m.drift_ratio.labels(name, distance.name).set(distance.ratio)
        state = (verdict.drifted, decision.action, tuple(s.name for s in verdict.sustained))
        if verdict.changed or self._last_said.get(name) != state:  # a line per change (state, decision, which
            # distances hold), not per interval
            self._say(f"class {name}: {verdict.reason}; {decision.action}: {decision.reason}")
            self._last_said[name] = state
        await self._send(name, {
            "drifted": verdict.drifted, "reason": verdict.reason,
            "distances": {d.name: d.ratio for d in verdict.latest if d.ratio is not None and math.isfinite(d.ratio)},
            "live": live.figures(), "reference": _finite(asdict(verdict.reference)),
            "decision": decision.action, "decision_reason": decision.reason,
            "retune": self._retune_ended.get(name),
            "valid_for_s": VERDICT_VALID_INTERVALS * self._config.drift.interval_s,
        })

    async def _send(self, name: str, report: dict[str, Any]) -> None:
        """The verdict to the gateway; a gateway that does not take it (restarting) gets the next one."""
        if self._gateway is None:
            return
        try:
            await self._gateway.report_drift(name, report)
            self._sent[name] = report
        except AdminCallFailed as exc:
            logger.warning("class %s: the gateway did not take the drift verdict: %s", name, exc)


def _finite(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with None for infinities and NaN (JSON has neither)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def _describe_reference(reference: ReferenceProfile) -> str:
    figures = [f"{label} {figure(value)}" for label, value in (
        ("concurrency", reference.concurrency), ("requests/s", reference.arrival_rate_per_s),
        ("prompt median", reference.prompt_median), ("output median", reference.output_median),
    ) if value is not None]
    return f"from {reference.source}: " + ", ".join(figures)
