"""Hostile input on the admin surface of a real `tpgate serve` (the session's shared gateway), kept apart from the
public routes' fuzzing in ``test_fuzz.py`` so that it grows with the admin API: today the admin routes are
``GET /admin/status`` and ``GET /admin/engine-targets``. When the admin API's own routes (studies, promotion,
rollback) and its OpenAPI schema arrive, their schema-driven fuzzing belongs here, under the same properties.

Properties: with any bearer token but the admin token, every admin route answers 401 and says nothing of the
gateway's state; with the admin token, any method, query string and extra header gets an answer below 500, in
time, in the OpenAI error shape when it is an error.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, BATCH_KEY

pytestmark = pytest.mark.integration

ADMIN_ROUTES = ("/admin/status", "/admin/engine-targets")
REQUEST_TIMEOUT_S = 30.0
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
query_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#%"),
                     max_size=40)


def call(gateway, method: str, path: str, token: str | None, extra: dict[str, str]) -> tuple[int, bytes, float]:
    headers = dict(extra)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    request = urllib.request.Request(gateway.url + path, data=body, method=method, headers=headers)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, resp.read(), time.monotonic() - started
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), time.monotonic() - started


@FUZZ
@given(path=st.sampled_from(ADMIN_ROUTES), query=query_text,
       token=st.sampled_from([None, API_KEY, BATCH_KEY, "", "admin", "x" * 300]) | st.text(
           alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60))
def test_without_the_admin_token_every_admin_route_is_401_and_tells_nothing(gateway, path, query, token):
    status, body, took_s = call(gateway, "GET", f"{path}?{query}", token or None, {})
    assert took_s < REQUEST_TIMEOUT_S
    assert status == 401, (path, token, status, body[:300])
    error = json.loads(body)["error"]
    assert error["type"] == "authentication_error"
    assert b"pools" not in body and b"127.0.0.1:" not in body  # no state, no engine address


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.sampled_from(ADMIN_ROUTES), query=query_text,
       extra=st.dictionaries(st.sampled_from(["x-workload-class", "accept", "content-type", "x-forwarded-for"]),
                             st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                             max_size=3))
def test_with_the_admin_token_any_request_is_answered_below_500(gateway, method, path, query, extra):
    status, body, took_s = call(gateway, method, f"{path}?{query}", gateway.admin_token, extra)
    assert took_s < REQUEST_TIMEOUT_S and status < 500, (method, path, status, body[:300])
    if method == "GET":
        assert status == 200 and isinstance(json.loads(body), dict | list)
    else:
        assert status == 405 and json.loads(body)["error"]["message"]
