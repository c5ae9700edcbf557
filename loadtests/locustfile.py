"""Locust users that send a tpgate workload profile to an OpenAI-compatible endpoint.

For people, with locust's web UI (users and spawn rate default to the profile's)::

    locust -f loadtests/locustfile.py --workload-profile interactive --host http://127.0.0.1:8000

(locust's own ``--profile`` only labels test runs; the workload is ``--workload-profile`` or the
``TPGATE_LOAD_PROFILE`` variable.) Headless and bounded, with a summary, is ``tpgate load``
(``loadtests.runner``), which runs this file.

Besides each request (its response time is the whole streamed response, its "size" the output tokens), every
successful streamed request reports two more locust entries under the same name: request type ``TTFT`` (time to
first token, ms) and ``TPOT`` (time per output token after the first, ms; "size" = output tokens). Locust's
"Aggregated" row therefore counts each request up to three times; read the per-type rows, or the exact summary
that ``tpgate load`` computes from the per-request records (``--records FILE``).

The run stops by itself: after the profile's warm-up plus duration, or once ``max_requests`` requests were
sent and answered. It stops at once, with the reason, when the target cannot be used: ``/v1/models`` fails
or lists no model, or the connection is refused before any request succeeded (``connection refused at URL``).
Statistics are reset when the warm-up ends, so locust's tables show the measured window. The request cap and
the record file are per locust process (distributed runs cap and record each worker).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import gevent.lock
from locust import FastHttpUser, events, task
from locust.contrib.fasthttp import FAILURE_EXCEPTIONS
from locust.env import Environment
from locust.exception import StopUser

from loadtests import failures
from loadtests.env import API_KEY_ENV, PROFILE_ENV, RECORDS_ENV
from loadtests.profile import ClosedLoop, Profile, load_profile
from loadtests.records import ClientLoad, Phase, RecordWriter, RequestRecord, Sent
from loadtests.stream import StreamTally, error_message, parse_response
from loadtests.workload import RequestSpec, arrival_offsets_s, build_request, request_specs, think_times_s

logger = logging.getLogger("tpgate.load")
SENT_INTERVAL_S = 0.5  # how often the count of sent requests goes to the records (while it changes)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument("--workload-profile", env_var=PROFILE_ENV, default="interactive",
                        help="shipped profile name (interactive, batch, long-context, sharegpt-like) or YAML path")
    parser.add_argument("--records", env_var=RECORDS_ENV, default="",
                        help="write one JSON line per request to this file (for exact percentiles)")
    parser.add_argument("--api-key", env_var=API_KEY_ENV, default="", is_secret=True,
                        help="bearer token for the target")


class LoadRun:
    """The shared state of one test run in this process: the request sequence, the cap, the phases."""

    def __init__(self, environment: Environment, profile: Profile, *, writer: RecordWriter | None,
                 api_key: str | None) -> None:
        self.environment = environment
        self.profile = profile
        self.api_key = api_key
        self.model = profile.model
        self.start_perf_s = time.perf_counter()
        self._writer = writer
        self._specs = request_specs(profile)
        self._arrivals = None if isinstance(profile.arrival, ClosedLoop) else arrival_offsets_s(profile)
        self._model_lock = gevent.lock.Semaphore()
        self._model_error: _RunAborted | None = None
        self._sent = 0
        self._in_flight = 0
        self._succeeded = 0
        self._cap_drained = gevent.event.Event()
        self._stopping = False
        self._stopped = gevent.event.Event()  # wakes users waiting for an arrival
        self.supervisor: gevent.Greenlet | None = None
        self.reporter: gevent.Greenlet | None = None

    # -- the request sequence -------------------------------------------------------------------
    def wait_for_arrival(self) -> None:
        """Open loop: sleep until the next request is due (users bound how many wait at once)."""
        if self._arrivals is not None:
            due_s = self.start_perf_s + next(self._arrivals)
            self._stopped.wait(timeout=max(0.0, due_s - time.perf_counter()))

    def take(self) -> RequestSpec | None:
        """The next request to send, or None once the run is stopping or the cap is spent."""
        if self._stopping or self._sent >= self.profile.max_requests:
            return None
        self._sent += 1
        self._in_flight += 1
        return next(self._specs)

    def finish(self, record: RequestRecord, *, host: str) -> None:
        self._in_flight -= 1
        self._succeeded += record.ok
        if self._writer is not None:
            self._writer.write(record)
        if self._sent >= self.profile.max_requests and self._in_flight == 0:
            self._cap_drained.set()
        if record.cause == failures.CONNECTION_REFUSED and not self._succeeded:
            # nothing listens there (the gateway is not running): say so now rather than fail for the whole run
            self.stop(f"error: {failures.describe(failures.CONNECTION_REFUSED, host)}")

    def ensure_model(self, user: FastHttpUser) -> str:
        """The model to ask for: the profile's, else the first one the target lists (asked once)."""
        with self._model_lock:
            if self._model_error is not None:
                raise self._model_error
            if self.model is None:
                try:
                    self.model = _discover_model(user, self.api_key)
                except _RunAborted as exc:
                    self._model_error = exc
                    raise
            return self.model

    # -- phases ---------------------------------------------------------------------------------
    def supervise(self) -> None:
        """Runs in its own greenlet: ends the warm-up, then stops the run at the deadline or the cap."""
        profile = self.profile
        if not self._cap_drained.wait(timeout=profile.warmup_s):
            self.environment.stats.reset_all()
            self._write_phase(Phase("measure", time.time()))
            self._cap_drained.wait(timeout=profile.duration_s)
        self.stop("max_requests" if self._sent >= profile.max_requests else "duration")

    def report_sent(self) -> None:
        """Runs in its own greenlet: the count of requests sent, so progress can show those in flight, and the
        client's own load (CPU, and how late this greenlet wakes), so the summary can flag a starved client."""
        written = None
        cpu_s, woke_s = time.process_time(), time.monotonic()
        while True:
            if self._sent != written:
                written = self._sent
                if self._writer is not None:
                    self._writer.write(Sent(time.time(), written))
            asked_s = time.monotonic()
            if self._stopped.wait(timeout=SENT_INTERVAL_S):
                return
            now_cpu_s, now_s = time.process_time(), time.monotonic()
            if self._writer is not None and now_s > woke_s:
                self._writer.write(ClientLoad(time.time(), cpu_ratio=(now_cpu_s - cpu_s) / (now_s - woke_s),
                                              lag_s=max(0.0, now_s - asked_s - SENT_INTERVAL_S)))
            cpu_s, woke_s = now_cpu_s, now_s

    def stop(self, reason: str, *, stop_runner: bool = True) -> None:
        """No more requests; requests in flight may finish (locust's --stop-timeout); then stop or quit."""
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        self._write_phase(Phase("stop", time.time(), reason))
        runner = self.environment.runner
        if not stop_runner or runner is None:
            return
        if self.environment.parsed_options is not None and self.environment.parsed_options.headless:
            gevent.spawn(runner.quit)
        else:
            gevent.spawn(runner.stop)  # the web UI stays up for the next test

    def close(self) -> None:
        """After the test stopped: record why (if nothing did yet) and close the record file."""
        for greenlet in (self.supervisor, self.reporter):
            if greenlet is not None and greenlet is not gevent.getcurrent():
                greenlet.kill(block=False)
        self.stop("stopped", stop_runner=False)
        if self._writer is not None:
            self._writer.close()

    def _write_phase(self, phase: Phase) -> None:
        if self._writer is not None:
            self._writer.write(phase)


def _discover_model(user: FastHttpUser, api_key: str | None) -> str:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with user.client.get("/v1/models", headers=headers, name="/v1/models", catch_response=True) as response:
        status = response.status_code or 0
        failure: _RunAborted | None = None
        models: list[str] = []
        if status == 0:  # no answer: locust records the exception and status 0
            cause = failures.exception_cause(getattr(response, "error", None))
            failure = _RunAborted(failures.describe(cause, user.host), cause)
        elif status != 200:
            failure = _RunAborted(f"GET {user.host}/v1/models answered {_http_error(response)}",
                                  failures.http_cause(status))
        else:
            with contextlib.suppress(ValueError, KeyError, TypeError):  # not a model list: none listed
                models = [str(m["id"]) for m in response.json()["data"]]
            if not models:
                failure = _RunAborted(f"GET {user.host}/v1/models answered HTTP 200 with no model",
                                      failures.BAD_RESPONSE)
        if failure is not None:
            response.failure(failure.reason)
            raise failure
    return models[0]


class _RunAborted(Exception):
    """The run cannot go on (for example: no model to ask for). ``reason`` names the target and the cause."""

    def __init__(self, reason: str, cause: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


class OpenAIUser(FastHttpUser):
    """Sends the profile's requests one after another; think time (closed loop) or arrivals (open loop)."""

    # _on_init sets network_timeout from the profile; locust's default of 60 s would cut long generations short
    network_timeout = 300.0
    connection_timeout = 10.0
    _next_user_index = 0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.user_index = OpenAIUser._next_user_index
        OpenAIUser._next_user_index += 1
        self._think_times: Iterator[float] | None = None

    def wait_time(self) -> float:
        run = _run_of(self.environment)
        if isinstance(run.profile.arrival, ClosedLoop):
            if self._think_times is None:
                self._think_times = think_times_s(run.profile, self.user_index)
            return next(self._think_times)
        return 0.0

    @task
    def send(self) -> None:
        run = _run_of(self.environment)
        run.wait_for_arrival()
        spec = run.take()
        if spec is None:
            raise StopUser()
        try:
            model = run.ensure_model(self)
        except _RunAborted as exc:
            run.finish(RequestRecord(index=spec.index, start_s=time.time(), e2e_s=0.0, ttft_s=None, output_tokens=0,
                                     prompt_tokens=spec.prompt_tokens, ok=False, status=0, error=exc.reason,
                                     cause=exc.cause), host=self.host)
            run.stop(f"error: {exc.reason}")
            raise StopUser() from None
        run.finish(self._send(run, spec, model), host=self.host)

    def _send(self, run: LoadRun, spec: RequestSpec, model: str) -> RequestRecord:
        profile = run.profile
        request = build_request(profile, spec, model=model, api_key=run.api_key)
        name = f"{profile.api} ({'stream' if profile.stream else 'no stream'})"
        tally = StreamTally(api=profile.api)
        start_s, start_perf_s = time.time(), time.perf_counter()
        error: str | None = None
        cause: str | None = None
        output_tokens = 0
        with self.client.request("POST", request.path, name=name, json=request.body, headers=request.headers,
                                 stream=profile.stream, catch_response=True) as response:
            status = response.status_code or 0
            try:
                if status == 0:  # no answer: locust records the exception and status 0
                    exception = getattr(response, "error", None)
                    cause = failures.exception_cause(exception)
                    error = f"{cause}: {exception}" if exception is not None else cause
                elif status != 200:
                    error, cause = _http_error(response), failures.http_cause(status)
                elif profile.stream:
                    for line in _sse_lines(response):
                        tally.feed_line(line, time.perf_counter() - start_perf_s)
                    error, output_tokens = tally.failure(), tally.output_tokens
                    if error is not None:
                        cause = failures.ERROR_EVENT if tally.error is not None else failures.BAD_RESPONSE
                else:
                    output_tokens, _, error = parse_response(response.json())
                    cause = None if error is None else failures.BAD_RESPONSE
            except FAILURE_EXCEPTIONS as exc:
                cause = failures.exception_cause(exc)
                error = f"{cause}: {type(exc).__name__}: {exc}"
            except ValueError as exc:  # a body that is not JSON
                error, cause = f"malformed response: {exc}", failures.BAD_RESPONSE
            e2e_s = time.perf_counter() - start_perf_s
            response.request_meta["response_time"] = e2e_s * 1000
            response.request_meta["response_length"] = output_tokens
            if error is None:
                response.success()
            else:
                response.failure(error)
        record = RequestRecord(
            index=spec.index, start_s=start_s, e2e_s=e2e_s, ttft_s=tally.first_token_s, output_tokens=output_tokens,
            prompt_tokens=spec.prompt_tokens, ok=error is None, status=status, error=error, cause=cause,
        )
        if record.ok:
            self._report_token_timings(name, record)
        return record

    def _report_token_timings(self, name: str, record: RequestRecord) -> None:
        fire = self.environment.events.request.fire
        if record.ttft_s is not None:
            fire(request_type="TTFT", name=name, response_time=record.ttft_s * 1000,
                 response_length=record.output_tokens, exception=None, context={})
        if record.tpot_s is not None:
            fire(request_type="TPOT", name=name, response_time=record.tpot_s * 1000,
                 response_length=record.output_tokens, exception=None, context={})


def _sse_lines(response: Any) -> Any:
    # FastResponse.iter_content(n) waits until n bytes arrived, which would delay the first token; the
    # geventhttpclient response underneath returns each line as soon as it is complete.
    raw = response._response
    while line := raw.readline(b"\n"):
        yield line.decode("utf-8", errors="replace")


def _http_error(response: Any) -> str:
    """``HTTP <status>: <the error's message>`` for an answer with an error status."""
    try:
        return f"HTTP {response.status_code}: {error_message(response.json())}"
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}"


def _run_of(environment: Environment) -> LoadRun:
    run = getattr(environment, "tpgate_run", None)
    assert run is not None, "test_start did not create the run"
    return run


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    profile = load_profile(options.workload_profile)  # fails here, before any user starts, on a bad profile
    OpenAIUser.network_timeout = profile.request_timeout_s
    if options.num_users is None:
        options.num_users = profile.users
    if options.spawn_rate is None:
        options.spawn_rate = profile.spawn_rate
    if not options.stop_timeout:
        options.stop_timeout = profile.drain_timeout_s
        environment.stop_timeout = profile.drain_timeout_s


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    assert options is not None, "the locustfile runs under locust's command line"
    profile = load_profile(options.workload_profile)
    # the file stays open for the whole test; test_stop closes it (LoadRun.close)
    writer = RecordWriter(open(options.records, "w", encoding="utf-8")) if options.records else None  # noqa: SIM115
    run = LoadRun(environment, profile, writer=writer, api_key=options.api_key or None)
    environment.tpgate_run = run  # type: ignore[attr-defined]
    OpenAIUser._next_user_index = 0
    run.supervisor = gevent.spawn(run.supervise)
    run.supervisor.link_exception(lambda g: logger.error("supervisor failed: %s", g.exception))
    run.reporter = gevent.spawn(run.report_sent)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    run = getattr(environment, "tpgate_run", None)
    if run is not None:
        run.close()
