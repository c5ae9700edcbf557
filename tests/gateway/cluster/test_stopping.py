"""The stop sequence: what the drain says and when it ends (plain values), signals counted after the first, and
the drain against a scripted controller."""

import asyncio
import os
import signal

import pytest

from gateway.cluster.stopping import DrainWatch, StopSignals, drain, end_inflight


def test_a_drain_with_nothing_in_flight_ends_once_every_router_counted_under_the_stop_table():
    watch = DrainWatch(deadline_s=130.0, limit_s=30.0)
    assert watch.step(now_s=100.0, requests=0, current=False) == ("wait", None)  # a router may not have seen it
    assert watch.step(now_s=100.5, requests=0, current=True) == ("drained", None)


def test_a_drain_says_how_many_are_left_when_that_changes_and_every_few_seconds():
    watch = DrainWatch(deadline_s=130.0, limit_s=30.0, progress_period_s=5.0)
    verdict, first = watch.step(now_s=100.0, requests=3, current=True)
    assert verdict == "wait"
    assert first == ("3 requests in flight; new requests get 503; waiting up to 30 s for them "
                     "(Ctrl-C again ends them now)")
    assert watch.step(now_s=101.0, requests=3, current=True) == ("wait", None)
    assert watch.step(now_s=102.0, requests=1, current=True) == ("wait", "1 request in flight, 28 s left")
    assert watch.step(now_s=106.0, requests=1, current=True) == ("wait", None)
    assert watch.step(now_s=107.0, requests=1, current=True) == ("wait", "1 request in flight, 23 s left")
    assert watch.step(now_s=108.0, requests=0, current=True) == ("drained", None)


def test_a_drain_ends_at_its_deadline():
    watch = DrainWatch(deadline_s=110.0, limit_s=10.0)
    watch.step(now_s=100.0, requests=2, current=True)
    assert watch.step(now_s=110.0, requests=2, current=True) == ("deadline", None)


def test_the_first_signal_interrupts_and_later_ones_are_counted():
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # handled in this thread before the next line runs
        assert signals.count == 1 and signals.first_at is not None
        os.kill(os.getpid(), signal.SIGTERM)  # no KeyboardInterrupt now
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.count == 3
    assert signal.getsignal(signal.SIGINT) is previous


def test_signals_while_the_gateway_is_removed_are_answered_with_a_line():
    said = []
    with StopSignals() as signals:
        signals.count = 1  # as after the first signal
        with signals.answered(said.append, "still stopping"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        assert signals.count == 3
        assert said == ["still stopping", "still stopping"]
        os.kill(os.getpid(), signal.SIGINT)  # the stop's own handler again
        assert signals.count == 4 and len(said) == 2


class ScriptedControl:
    """A controller whose routers report, poll after poll, the counts in ``script`` (the last one repeats); once
    told to end them, they report none."""

    def __init__(self, script):
        self.script = list(script)
        self.phases = []

    async def set_stop_phase(self, phase):
        self.phases.append(phase)
        return len(self.phases)

    async def inflight(self):
        if self.phases[-1] == "ending":
            return {"requests": 0, "routers": 1, "current": True}
        requests = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return {"requests": requests, "routers": 1, "current": True}


def test_drain_waits_for_the_requests_in_flight_and_ends_nothing():
    control, said = ScriptedControl([2, 2, 1, 0]), []
    with StopSignals() as signals:
        signals.count = 1
        drain(control, signals, limit_s=30, say=said.append, call=asyncio.run)
    assert control.phases == ["draining"]
    assert said[0].startswith("2 requests in flight; new requests get 503")
    assert said[1].startswith("1 request in flight")


def test_drain_ends_the_requests_in_flight_at_a_second_signal():
    control, said = ScriptedControl([5]), []
    with StopSignals() as signals:
        signals.count = 2  # the second came while it drained
        drain(control, signals, limit_s=30, say=said.append, call=asyncio.run)
    assert control.phases == ["draining", "ending"]
    assert said == ["ending 5 requests in flight (streams get an error event and [DONE])"]


def test_drain_ends_the_requests_in_flight_at_its_deadline():
    control, said = ScriptedControl([1]), []
    with StopSignals() as signals:
        signals.count = 1
        drain(control, signals, limit_s=0.3, say=said.append, call=asyncio.run)
    assert control.phases == ["draining", "ending"]
    assert said[1:] == ["the drain's 0.3 s are over",
                        "ending 1 request in flight (streams get an error event and [DONE])"]


def test_a_router_that_never_ends_its_requests_does_not_hold_the_stop():
    class Stuck(ScriptedControl):
        async def inflight(self):
            return {"requests": 1, "routers": 1, "current": True}

    said = []
    end_inflight(Stuck([1]), say=said.append, call=asyncio.run, timeout_s=0.3)
    assert said[-1] == "1 request still reported in flight after 0.3 s; stopping anyway"


def test_a_controller_that_fails_ends_the_drain_with_a_line():
    class Gone(ScriptedControl):
        async def set_stop_phase(self, phase):
            raise RuntimeError("the controller is unavailable: RayActorError")

    said = []
    with StopSignals() as signals:
        drain(Gone([0]), signals, limit_s=30, say=said.append, call=asyncio.run)
    assert said == ["cannot drain: the controller is unavailable: RayActorError"]
