"""The front door's stamp: how long a request waited in front of the router."""

import pytest

from gateway.dataplane.front import CLOCK_SKEW_TOLERANCE_S, MAX_FRONT_WAIT_S, front_wait_s

NOW_S = 1_800_000_000.0


def stamp(seconds_ago: float) -> str:
    return str(round((NOW_S - seconds_ago) * 1e6))


def test_the_wait_is_the_time_since_the_front_received_the_request():
    assert front_wait_s(stamp(0.25), now_unix_s=NOW_S) == pytest.approx(0.25, abs=1e-6)


def test_a_stamp_slightly_in_the_future_is_clock_skew_and_counts_as_no_wait():
    assert front_wait_s(stamp(-CLOCK_SKEW_TOLERANCE_S / 2), now_unix_s=NOW_S) == 0.0


@pytest.mark.parametrize("value", [None, "", "abc", "-5", "1.5e9", stamp(MAX_FRONT_WAIT_S + 1),
                                   stamp(-2 * CLOCK_SKEW_TOLERANCE_S)])
def test_missing_malformed_or_implausible_stamps_are_not_believed(value):
    assert front_wait_s(value, now_unix_s=NOW_S) is None
