"""The time a request spent in front of the router: from the front door (HAProxy) having received its headers to
the router starting on it — HAProxy's queue, the router replica's accept backlog, Serve's replica HTTP stack,
and the router's own event loop while it is busy with other requests.

On the HAProxy fast path the front stamps every request with :data:`FRONT_RECEIVED_HEADER` (Unix time in
microseconds, HAProxy's ``date(0,us)`` when its frontend rules run, once the request's headers are in; a client's
own value is replaced). The router counts its
latency figures (e2e, TTFT) from that moment, so they include the wait in front of it, and exports the wait on
its own. Pure: no I/O.
"""

from __future__ import annotations

FRONT_RECEIVED_HEADER = "x-tpgate-front-received-us"
# Beyond this the stamp is not believed (clocks of two nodes disagree, or a stale value): the router counts from
# its own start instead.
MAX_FRONT_WAIT_S = 600.0
# HAProxy and the router may run on different nodes: a stamp this far in the router's future is clock skew,
# counted as no wait.
CLOCK_SKEW_TOLERANCE_S = 0.05


def front_wait_s(stamp: str | None, *, now_unix_s: float) -> float | None:
    """Seconds from the front's stamp (Unix microseconds, as text) to ``now_unix_s``; None when there is no stamp
    or it is not a number or implausible (more than :data:`MAX_FRONT_WAIT_S` old, or more than
    :data:`CLOCK_SKEW_TOLERANCE_S` in the future). A stamp slightly in the future counts as 0."""
    if stamp is None or not stamp.isdigit():
        return None
    wait_s = now_unix_s - int(stamp) / 1e6
    if wait_s > MAX_FRONT_WAIT_S or wait_s < -CLOCK_SKEW_TOLERANCE_S:
        return None
    return max(0.0, wait_s)
