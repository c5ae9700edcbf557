"""How a running gateway stops, as the person who runs it sees it.

- :class:`StopSignals`: SIGINT and SIGTERM while the gateway runs, whatever the process inherited (a shell starts
  background jobs with SIGINT ignored). The first raises KeyboardInterrupt in the main thread, which interrupts
  whatever that thread waits on; later ones are only counted, and the stop sequence acts on them.
- :func:`drain`: the routers refuse new requests (503 ``stopping``) while those in flight finish; a line says how
  many are left, whenever that changes and every few seconds with the time left. A second signal, or the
  deadline, ends them (:func:`end_inflight`: a stream gets a last SSE error event and ``[DONE]``, a request not yet
  answered a 503). With nothing in flight the drain takes one round of router reports (about half a second).
- :class:`DrainWatch`: the pure part: from counts and times, whether to wait on and what to say.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.control.client import ControlClient

PROGRESS_PERIOD_S = 5.0  # a waiting drain says how it stands at least this often
POLL_S = 0.2
ENDING_TIMEOUT_S = 5.0  # routers end their requests within milliseconds; this bounds a router that does not answer
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

DrainVerdict = Literal["wait", "drained", "deadline"]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


class StopSignals:
    """SIGINT and SIGTERM, counted from the moment the block is entered (install it after ``ray.init``, which sets
    a SIGTERM handler of its own). The first raises KeyboardInterrupt; ``first_at`` is when it came (monotonic
    seconds), ``count`` how many came."""

    def __init__(self) -> None:
        self.count = 0
        self.first_at: float | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        sys.stdout.flush()

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.first_at = time.monotonic()
            raise KeyboardInterrupt

    @contextmanager
    def answered(self, say: Callable[[str], None], line: str) -> Iterator[None]:
        """While the block runs, each further signal is answered with ``line`` (said once per signal)."""
        seen = self.count
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def handle(signum: int, frame: Any) -> None:
            nonlocal seen
            self.count += 1
            if self.count > seen:
                seen = self.count
                say(line)

        for sig in STOP_SIGNALS:
            signal.signal(sig, handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class DrainWatch:
    """What a drain says, and when it is over. Times are monotonic seconds; ``deadline_s`` is one of them.

    A count is only trusted once ``current``: every live router counted under the table that refuses new requests
    (before that, a router could still admit one it has not counted)."""

    deadline_s: float
    limit_s: float  # the drain's whole allowance, for the first line
    progress_period_s: float = PROGRESS_PERIOD_S
    _said: tuple[int, float] | None = field(default=None, init=False)

    def step(self, *, now_s: float, requests: int, current: bool) -> tuple[DrainVerdict, str | None]:
        if current and requests == 0:
            return "drained", None
        if now_s >= self.deadline_s:
            return "deadline", None
        if requests == 0:
            return "wait", None
        left_s = max(0.0, self.deadline_s - now_s)
        if self._said is None:
            self._said = (requests, now_s)
            return "wait", (f"{plural(requests, 'request')} in flight; new requests get 503; waiting up to "
                            f"{self.limit_s:g} s for them (Ctrl-C again ends them now)")
        count, at_s = self._said
        if requests != count or now_s - at_s >= self.progress_period_s:
            self._said = (requests, now_s)
            return "wait", f"{plural(requests, 'request')} in flight, {left_s:.0f} s left"
        return "wait", None


def drain(client: ControlClient, signals: StopSignals, *, limit_s: float, say: Callable[[str], None],
          call: Callable[[Any], Any]) -> None:
    """Refuse new requests, wait (at most ``limit_s``) for those in flight, then end what is left. ``call`` runs
    one control-client call from synchronous code. A controller that does not answer ends the drain at once."""
    try:
        call(client.set_stop_phase("draining"))
        watch = DrainWatch(deadline_s=time.monotonic() + limit_s, limit_s=limit_s)
        while signals.count < 2:
            inflight = call(client.inflight())
            verdict, line = watch.step(now_s=time.monotonic(), requests=inflight["requests"],
                                       current=inflight["current"])
            if line is not None:
                say(line)
            if verdict == "drained":
                return
            if verdict == "deadline":
                say(f"the drain's {limit_s:g} s are over")
                break
            time.sleep(POLL_S)
        end_inflight(client, say=say, call=call)
    except RuntimeError as exc:  # ControllerUnavailable, or the controller failed the call
        say(f"cannot drain: {exc}")


def end_inflight(client: ControlClient, *, say: Callable[[str], None], call: Callable[[Any], Any],
                 timeout_s: float = ENDING_TIMEOUT_S) -> None:
    """Have the routers end every request in flight, and wait until they report none (at most ``timeout_s``)."""
    inflight = call(client.inflight())
    say(f"ending {plural(inflight['requests'], 'request')} in flight (streams get an error event and [DONE])")
    call(client.set_stop_phase("ending"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inflight = call(client.inflight())
        if inflight["current"] and inflight["requests"] == 0:
            return
        time.sleep(POLL_S)
    say(f"{plural(inflight['requests'], 'request')} still reported in flight after {timeout_s:g} s; stopping anyway")
