"""Hostile input against a real `tpgate serve` (the session's shared gateway): property-based fuzzing of every
public route (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, `/metrics`, `/admin/status`) with
bodies drawn from an OpenAI-subset schema, broken JSON, random bytes, random headers and methods; and the limits:
header size and count, body size, JSON nesting, a body or headers that trickle in (slow loris).

Every answer must come within the client's timeout, never be a 5xx, and carry the OpenAI error shape when it is an
error; after the fuzzing the gateway still serves and its routers were never replaced. The admin API's own routes
(beyond `/admin/status`) are fuzzed with the admin API's schema in a module of their own.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, BATCH_KEY

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
REQUEST_TIMEOUT_S = 30.0  # a fuzzed request answered later than this is a hang
BODY_READ_TIMEOUT_S = 2.0  # the session gateway's router.body_read_timeout_s
HEADER_TIMEOUT_S = 10.0  # gateway/cluster/haproxy_guard.py: HAProxy's timeout http-request
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- an OpenAI subset, with hostile values mixed into every field ----------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=False),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)
def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values three times in four, so that the fuzzing reaches the engines and not only the first check."""
    return st.sampled_from((True, False, False, False)).flatmap(lambda pick_hostile: hostile if pick_hostile else valid)


models = mostly(st.sampled_from([MODEL, f"{MODEL}:interactive", f"{MODEL}:batch"]),
                st.sampled_from([f"{MODEL}:", f"{MODEL}:nope", "gpt-4", "", ":", "../../etc/passwd", "x" * 300])
                | scalars)
max_tokens = mostly(st.integers(1, 12), st.sampled_from([2**31, 10**12, -2**63, 0, -1]) | scalars)
content = mostly(st.text(max_size=60), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "bogus"]), "text": st.text(max_size=20)}), max_size=2) | scalars)
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["tool", "root", ""]) | scalars),
     "content": content},
    optional={"name": st.text(max_size=10), "tool_calls": json_values})
optional = {
    "max_tokens": max_tokens,
    "stream": mostly(st.booleans(), scalars),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), json_values),
    "temperature": mostly(st.floats(0, 2), st.floats(-5, 5) | scalars),
    "top_p": mostly(st.floats(0.01, 1), st.floats(-1, 2) | scalars),
    "n": mostly(st.just(1), st.integers(-1, 3) | scalars),
    "stop": mostly(st.lists(st.text(min_size=1, max_size=5), max_size=3), scalars),
    "ignore_eos": st.booleans() | scalars,
    "seed": mostly(st.integers(0, 2**31), st.integers(-2**70, 2**70) | scalars),
    "extra_field": json_values,
}
chat_bodies = st.fixed_dictionaries(
    {"model": models, "messages": mostly(st.lists(message, min_size=1, max_size=3), json_values)},
    optional=optional)
completion_bodies = st.fixed_dictionaries(
    {"model": models,
     "prompt": mostly(st.text(max_size=60) | st.lists(st.text(max_size=20), min_size=1, max_size=3), json_values)},
    optional=optional)
auth_headers = mostly(st.sampled_from([API_KEY, BATCH_KEY]),
                      st.sampled_from([None, "sk-wrong", "", "Bearer", "x" * 500]))
class_headers = mostly(st.sampled_from([None, None, "interactive", "batch"]),
                       st.sampled_from(["trial-1", "", "INTERACTIVE"])
                       | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30))


def send(gateway, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes, float]:
    """Status, body and seconds taken; a connection the gateway dropped is status 0."""
    request = urllib.request.Request(gateway.url + path, data=body, method=method, headers=headers)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, resp.read(), time.monotonic() - started
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), time.monotonic() - started


def check_answer(status: int, body: bytes, took_s: float, *, what: str) -> None:
    assert took_s < REQUEST_TIMEOUT_S, f"{what}: answered after {took_s:.1f} s"
    assert 200 <= status < 500, f"{what}: status {status}: {body[:500]!r}"
    if status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str), body[:500]


def headers_for(key: str | None, route: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if route is not None:
        headers["x-workload-class"] = route
    return headers


def router_pids(gateway) -> set[int]:
    children = psutil.Process(gateway.process.pid).children(recursive=True)
    return {p.pid for p in children if p.cmdline()[:1] == ["ray::ServeReplica:tpgate:router"]}


@pytest.fixture(scope="module")
def routers(gateway) -> set[int]:
    """The router replicas before the fuzzing (the same ones must serve after it)."""
    pids = router_pids(gateway)
    assert pids
    return pids


@pytest.fixture(scope="module")
def statuses(routers):
    """Every status the fuzzing saw, by route (printed at the end: what the fuzzing reached)."""
    seen: dict[str, Counter] = {}
    yield seen
    for path, counts in seen.items():
        print(f"fuzzed {path}: {sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}")


def _fuzz_one(gateway, statuses, path: str, body: object, key: str | None, route: str | None) -> None:
    data = json.dumps(body).encode()  # NaN never drawn; huge integers are valid JSON
    status, answer, took_s = send(gateway, "POST", path, data, headers_for(key, route))
    statuses.setdefault(path, Counter())[status] += 1
    check_answer(status, answer, took_s, what=f"POST {path} {data[:300]!r}")


@FUZZ
@given(body=chat_bodies, key=auth_headers, route=class_headers)
def test_fuzzed_chat_completions_never_fail_the_gateway(gateway, statuses, body, key, route):
    _fuzz_one(gateway, statuses, "/v1/chat/completions", body, key, route)


@FUZZ
@given(body=completion_bodies, key=auth_headers, route=class_headers)
def test_fuzzed_completions_never_fail_the_gateway(gateway, statuses, body, key, route):
    _fuzz_one(gateway, statuses, "/v1/completions", body, key, route)


@settings(FUZZ, max_examples=40)
@given(body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_bytes_that_are_not_json_are_400s(gateway, statuses, body, path, content_type):
    status, answer, took_s = send(gateway, "POST", path, body, {"content-type": content_type,
                                                                 "authorization": f"Bearer {API_KEY}"})
    statuses.setdefault(f"{path} (bytes)", Counter())[status] += 1
    check_answer(status, answer, took_s, what=f"POST {path} {body[:200]!r}")


@settings(FUZZ, max_examples=40)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(["/v1/models", "/health", "/metrics", "/admin/status", "/v1/chat/completions",
                             "/v1/completions", "/v1/embeddings", "/admin", "/", "/v1/models/../../admin/status",
                             "/%2e%2e/admin/status", "/v1//models"]),
       key=auth_headers)
def test_every_route_and_method_answers_without_a_5xx(gateway, statuses, method, path, key):
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    status, answer, took_s = send(gateway, method, path, body, headers_for(key, None))
    statuses.setdefault(f"{method} {path}", Counter())[status] += 1
    assert took_s < REQUEST_TIMEOUT_S and 200 <= status < 500, (method, path, status, answer[:300])
    if path == "/admin/status":
        # the router's own GET: 401; another method goes to the admin API: 401 without a token, 403 a wrong one
        assert status in (401, 403, 405), "the admin status answered without the admin token"


def test_the_gateway_still_serves_after_the_fuzzing_and_no_router_was_replaced(gateway, routers):
    status, answer, _ = send(gateway, "POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}).encode(),
        headers_for(API_KEY, None))
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 4
    assert router_pids(gateway) == routers and gateway.all_ready()


# --- limits -------------------------------------------------------------------------------------------------------


def raw_exchange(gateway, payload: bytes, *, read_timeout_s: float) -> bytes:
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout_s) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


@pytest.mark.parametrize(("what", "headers", "status"), [
    ("one 32 KiB header", {"x-pad": "a" * 32768}, 400),
    ("150 headers", {f"x-h{i}": "v" for i in range(150)}, 400),
    ("an 8 KiB header", {"x-pad": "a" * 8192}, 200),
])
def test_header_size_and_count_are_bounded_by_the_fast_path(gateway, what, headers, status):
    answer, _, took_s = send(gateway, "GET", "/v1/models", None, {"authorization": f"Bearer {API_KEY}", **headers})
    assert answer == status and took_s < 5, what


def test_a_body_over_the_limit_is_413_from_its_declared_length_before_it_is_sent(gateway):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + API_KEY.encode() + b"\r\ncontent-length: 100000000\r\n\r\n")
    answer = raw_exchange(gateway, head + b"{", read_timeout_s=10)
    assert answer.startswith(b"HTTP/1.1 413")


def test_deep_nesting_is_400(gateway):
    deep = b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer, _ = send(gateway, "POST", "/v1/chat/completions", deep, headers_for(API_KEY, None))
    assert status == 400 and "deeper than the limit" in json.loads(answer)["error"]["message"]


def test_slow_loris_clients_are_cut_off_and_do_not_hold_the_gateway(gateway):
    """20 clients that trickle a body and 20 that trickle headers, all at once: the first are answered 408 by the
    router after body_read_timeout_s, the second by HAProxy after its header timeout; meanwhile and afterwards
    ordinary requests are served."""
    answers: dict[str, list[bytes]] = {"body": [], "headers": []}
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + API_KEY.encode() + b"\r\ncontent-length: 1000\r\n\r\n")

    def trickle(kind: str, first: bytes, drip: bytes) -> None:
        host, port = gateway.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 10) as sock:
            sock.sendall(first)
            deadline = time.monotonic() + HEADER_TIMEOUT_S + 8
            answer = b""
            sock.settimeout(1.0)
            while time.monotonic() < deadline and not answer:
                try:
                    sock.sendall(drip)
                    answer = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:  # closed by the gateway mid-write
                    break
            answers[kind].append(answer)

    threads = [threading.Thread(target=trickle, args=("body", head + b"{", b" ")) for _ in range(20)]
    threads += [threading.Thread(target=trickle, args=("headers", b"GET /v1/models HTTP/1.1\r\n", b"x-a: b\r\n"))
                for _ in range(20)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    served_meanwhile = send(gateway, "POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode(),
        headers_for(API_KEY, None))[0]
    for thread in threads:
        thread.join(timeout=HEADER_TIMEOUT_S + 20)
    took_s = time.monotonic() - started
    print(f"slow loris: body answers {Counter(a[:12] for a in answers['body'])}, "
          f"header answers {Counter(a[:12] for a in answers['headers'])}, all done in {took_s:.1f} s")
    assert served_meanwhile == 200
    assert len(answers["body"]) == 20 and all(a.startswith(b"HTTP/1.1 408") for a in answers["body"])
    assert len(answers["headers"]) == 20 and all(a.startswith(b"HTTP/1.1 408") or a == b""
                                                 for a in answers["headers"])
    assert took_s < HEADER_TIMEOUT_S + 10
