"""Ray Serve's settings on the router replicas' request path, as tpgate sets them (chosen by measurement: the
ablation in docs/benchmarks.md).

Ray 2.60 reads these from the replica process's environment when ``ray.serve`` is imported there, so they go
into the router deployment's ``runtime_env`` (they then hold in a cluster tpgate joins, too). Each one an
operator sets in ``tpgate serve``'s own environment wins over tpgate's value.

- ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``: the router runs on the replica's own event loop, so a
  request is not handed from the replica's loop to a second loop in another thread and back for every ASGI
  message (Ray's default runs user code in a separate thread).
- ``RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1000``, ``RAY_SERVE_LOG_TO_STDERR=0``: Serve's replica log records
  are buffered (flushed every 1000 records, and at once on an ERROR) and not also written to stderr.
- ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0``: see :data:`gateway.cluster.builders.NO_DRAINING_WINDOW`.

Serve's per-request access-log record is a deployment option (``router.serve_access_log``), not a variable.
With user code on the replica's loop, HAProxy may also mark each request ``x-request-disconnect-disabled: ?1``
(:func:`skip_disconnect_watch`): Serve then awaits the router directly instead of racing it against a
disconnect-watching task of its own. The router watches the client itself
(:func:`gateway.dataplane.relay.until_disconnect`, on the same ASGI ``receive``), so a client that goes away
still cancels the engine request.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.dataplane.front import FRONT_RECEIVED_HEADER

SEPARATE_THREAD = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
ROUTER_SERVE_ENV = {
    SEPARATE_THREAD: "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}
# "0" keeps Serve's per-request disconnect watcher on the fast path (HAProxy then adds no header)
SKIP_DISCONNECT_WATCH = "TPGATE_HAPROXY_SKIP_DISCONNECT_WATCH"
DISCONNECT_DISABLED_HEADER = "x-request-disconnect-disabled"


def router_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The router replicas' Serve variables: tpgate's values, each overridden by ``environ``'s own."""
    return {name: environ.get(name, value) for name, value in ROUTER_SERVE_ENV.items()}


def front_rules(environ: Mapping[str, str]) -> list[str]:
    """The ``http-request`` rules HAProxy's front applies to every request (replacing a client's own value):
    the time HAProxy had the request's headers (:data:`FRONT_RECEIVED_HEADER`, Unix microseconds), and
    the disconnect mark when :func:`skip_disconnect_watch`."""
    rules = [f"http-request set-header {FRONT_RECEIVED_HEADER} %[date(0,us)]"]
    if skip_disconnect_watch(environ, router_env_vars(environ)):
        rules.append(f"http-request set-header {DISCONNECT_DISABLED_HEADER} ?1")
    return rules


def skip_disconnect_watch(environ: Mapping[str, str], router_env: Mapping[str, str]) -> bool:
    """Whether HAProxy marks requests so that Serve skips its own disconnect watcher: only when user code runs
    on the replica's loop (in a separate thread Serve's watcher is what carries ``receive`` across loops), and
    unless ``environ`` turns it off."""
    return router_env.get(SEPARATE_THREAD) == "0" and environ.get(SKIP_DISCONNECT_WATCH, "1") != "0"
