"""Hostile input on the admin surface of a real `tpgate serve` (the session's shared gateway), apart from the
public routes' fuzzing in ``test_fuzz.py``: the router's own admin routes (``/admin/status``,
``/admin/engine-targets``) and every operation of the admin API's OpenAPI schema (``/admin/openapi.json``).

Properties: without the admin token an admin route answers 401 or 403 and says nothing of the gateway's state;
with it, any request gets an answer below 500, in time, in the OpenAI error shape when it is an error. Schema
fuzzing never changes the gateway: every identifier in a path is one no object has (``fuzz-...``), and every body
carries a field no input model has, so that the admin API refuses it (its inputs forbid extra fields) after
parsing every other field drawn for it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, BATCH_KEY
from tests.integration.test_fuzz import send

pytestmark = pytest.mark.integration

ADMIN_ROUTES = ("/admin/status", "/admin/engine-targets")
TOKEN_ROUTES = (*ADMIN_ROUTES, "/admin/engine-metrics")  # the last relays one engine's /metrics (?pool=&replica=)
REQUEST_TIMEOUT_S = 30.0
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
query_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#%"),
                     max_size=40)


def call(gateway, method: str, path: str, token: str | None, extra: dict[str, str]) -> tuple[int, bytes, float]:
    headers = dict(extra)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return send(gateway, method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None, headers)


@FUZZ
@given(path=st.sampled_from(TOKEN_ROUTES), query=query_text,
       token=st.sampled_from([None, API_KEY, BATCH_KEY, "", "admin", "x" * 300]) | st.text(
           alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60))
def test_without_the_admin_token_every_admin_route_is_401_and_tells_nothing(gateway, path, query, token):
    status, body, took_s = call(gateway, "GET", f"{path}?{query}", token or None, {})
    assert took_s < REQUEST_TIMEOUT_S
    assert status in (401, 403), (path, token, status, body[:300])
    assert json.loads(body)["error"]["message"]
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
        assert 400 <= status < 500 and json.loads(body)["error"]["message"]


# --- the admin API's own operations, from its OpenAPI schema ------------------------------------------------------

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
UNKNOWN_FIELD = "tpgate_fuzz_unknown_field"
identifiers = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", max_size=24).map(lambda t: f"fuzz-{t}")
hostile_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def operations(gateway) -> list[tuple[str, str, list[str]]]:
    """(method, path template, body field names) of every operation in the admin API's schema."""
    request = urllib.request.Request(gateway.url + "/admin/openapi.json",
                                     headers={"authorization": f"Bearer {gateway.admin_token}"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
        schema = json.loads(resp.read())
    components = schema.get("components", {}).get("schemas", {})
    found = []
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            ref = body.get("$ref", "").rsplit("/", 1)[-1]
            fields = list(components.get(ref, body).get("properties", {}))
            found.append((method.upper(), path, fields))
    assert len(found) >= 10, found
    return found


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_every_admin_api_operation_answers_hostile_input_below_500(gateway, operations, data):
    method, template, fields = data.draw(st.sampled_from(operations), label="operation")
    path = template
    while "{" in path:
        head, _, rest = path.partition("{")
        path = head + urllib.parse.quote(data.draw(identifiers, label="id"), safe="") + rest.partition("}")[2]
    query = data.draw(st.dictionaries(st.sampled_from(["trial", "limit", "class", "force", "x"]), st.text(max_size=10),
                                      max_size=2), label="query")
    if query:
        path += "?" + urllib.parse.urlencode(query)
    body = None
    if method in MUTATING and method != "DELETE":
        drawn = data.draw(st.fixed_dictionaries({}, optional={f: hostile_values for f in fields}), label="body")
        body = json.dumps({**drawn, UNKNOWN_FIELD: True}).encode()
    token = data.draw(st.sampled_from([gateway.admin_token] * 3 + [API_KEY, None]), label="token")
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(gateway.url + path, data=body, method=method, headers=headers)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
            status, answer = resp.status, resp.read()
    except urllib.error.HTTPError as error:
        with error:
            status, answer = error.code, error.read()
    assert time.monotonic() - started < REQUEST_TIMEOUT_S
    assert status < 500, (method, path, body, status, answer[:500])
    if token != gateway.admin_token:
        assert status in (401, 403), (method, path, status)
    if method in MUTATING:
        assert status >= 400, (method, path, body, status, answer[:300])  # nothing was changed
    if status >= 400:
        assert json.loads(answer)["error"]["message"]


def test_the_admin_api_fuzzing_changed_nothing(gateway):
    status = gateway.status()
    assert set(status["pools"]) == {"small-tp1", "big-tp2"} and gateway.all_ready()
    assert not [p for p in status["pools"] if p.startswith("fuzz-")]
