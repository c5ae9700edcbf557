import socket

import gevent
import pytest

from loadtests import failures


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (TimeoutError("timed out"), "timeout"),
        (gevent.Timeout(1.0), "timeout"),  # gevent's is not an OSError
        (ConnectionResetError(104, "Connection reset by peer"), "connection lost"),
        (BrokenPipeError(32, "Broken pipe"), "connection lost"),
        (socket.gaierror(-2, "Name or service not known"), "connection error"),
        (OSError(113, "No route to host"), "connection error"),
        (None, "connection error"),
    ],
)
def test_exceptions_map_to_a_few_causes(error, cause):
    assert failures.exception_cause(error) == cause


def test_connection_closed_by_the_server_is_a_lost_connection():
    from geventhttpclient.response import HTTPConnectionClosed

    assert failures.exception_cause(HTTPConnectionClosed("closed")) == "connection lost"


def test_http_cause_and_the_one_line_reason():
    assert failures.http_cause(503) == "HTTP 503"
    assert failures.describe("connection refused", "http://127.0.0.1:8000") == "connection refused at http://127.0.0.1:8000"
