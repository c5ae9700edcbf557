"""Why a request failed, as one of a few causes a summary can count (pure: no locust, no gevent).

A cause is a short phrase: ``connection refused`` (nothing listens at the address), ``timeout`` (no answer in
time), ``connection lost`` (the connection closed or reset mid-request), ``connection error`` (any other
socket failure: an unreachable host, a name that does not resolve, TLS), ``HTTP <status>`` (the target
answered with an error status), ``error event`` (a stream that ended with an error event), ``bad response``
(a 200 whose body is not what the API promises: malformed JSON, no choices, a stream cut short).
"""

from __future__ import annotations

CONNECTION_REFUSED = "connection refused"
TIMEOUT = "timeout"
CONNECTION_LOST = "connection lost"
CONNECTION_ERROR = "connection error"
ERROR_EVENT = "error event"
BAD_RESPONSE = "bad response"


def http_cause(status: int) -> str:
    """The cause for an answer with an error status."""
    return f"HTTP {status}"


def exception_cause(error: BaseException | None) -> str:
    """The cause for an exception raised while connecting, sending or reading (None: the client gave no reason)."""
    if isinstance(error, ConnectionRefusedError):
        return CONNECTION_REFUSED
    # gevent's Timeout is not an OSError; recognized by name so that this module needs no gevent
    if isinstance(error, TimeoutError) or any(
        cls.__name__ == "Timeout" for cls in type(error).__mro__
    ):
        return TIMEOUT
    if isinstance(error, ConnectionResetError | ConnectionAbortedError | BrokenPipeError) or (
        error is not None and type(error).__name__ == "HTTPConnectionClosed"
    ):
        return CONNECTION_LOST
    return CONNECTION_ERROR


def describe(cause: str, host: str) -> str:
    """The one-line reason a run that never reached its target gives: ``connection refused at URL``."""
    return f"{cause} at {host}"
