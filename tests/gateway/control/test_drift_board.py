"""The gateway's board of drift verdicts: the events a report brings, once each, and stale verdicts."""

from gateway.control.drift_board import DriftBoard


def verdict(drifted, *, retune=None, valid_for_s=90.0, reason="drifted: concurrency 64 vs 16 (x4.0)"):
    return {"drifted": drifted, "reason": reason, "decision": "advise", "decision_reason": "would re-tune",
            "retune": retune, "valid_for_s": valid_for_s}


def kinds(events):
    return [e.kind for e in events]


def test_a_drift_and_its_clearing_are_one_event_each_however_often_they_are_reported():
    board = DriftBoard()
    assert board.report("batch", verdict(False, reason="within bounds"), now_s=0) == []
    [detected] = board.report("batch", verdict(True), now_s=30)
    assert (detected.kind, detected.message) == ("drift.detected", "class batch: drifted: concurrency 64 vs 16 (x4.0)")
    assert board.report("batch", verdict(True), now_s=60) == []
    assert kinds(board.report("batch", verdict(False), now_s=90)) == ["drift.cleared"]
    assert board.drifted(now_s=90) == {"batch": 0}


def test_a_re_tune_that_ended_is_one_event_even_when_resent():
    board = DriftBoard()
    ended = {"result": "promoted", "reason": "+40% output tokens/s; promoted", "ended_unix_s": 1000.0}
    assert kinds(board.report("batch", verdict(True, retune=ended), now_s=0)) == ["drift.detected",
                                                                                  "retune.promoted"]
    assert kinds(board.report("batch", verdict(False, retune=ended), now_s=30)) == ["drift.cleared"]
    assert board.report("batch", verdict(False, retune=ended), now_s=60) == []  # the same re-tune, resent
    later = {**ended, "result": "kept", "reason": "not better by the 5% margin", "ended_unix_s": 2000.0}
    [event] = board.report("batch", verdict(False, retune=later), now_s=90)
    assert (event.kind, event.message) == ("retune.kept", "class batch: not better by the 5% margin")


def test_a_verdict_past_its_validity_is_stale_and_no_longer_drifted():
    board = DriftBoard()
    board.report("batch", verdict(True, valid_for_s=90), now_s=0)
    assert board.drifted(now_s=90) == {"batch": 1}
    assert board.as_dict(now_s=90)["batch"]["stale"] is False
    assert board.drifted(now_s=91) == {}  # the monitor stopped: the gauge goes, the state says stale
    shown = board.as_dict(now_s=91)["batch"]
    assert shown["stale"] is True and shown["age_s"] == 91 and shown["drifted"] is True
    # the monitor comes back: a drift seen again is told again
    assert kinds(board.report("batch", verdict(True), now_s=100)) == ["drift.detected"]
