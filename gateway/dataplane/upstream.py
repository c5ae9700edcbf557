"""Talking to engines: one aiohttp session per process, explicit timeouts, SSE events split as they arrive.

An attempt fails *before commitment* (nothing sent to the client yet) with :class:`UpstreamFailure`; the
router may then retry on another replica. What counts as retryable: the connection could not be made,
or it broke before the response (or, when streaming, before its first event) arrived, or the engine
answered 502/503. A timeout is not retried: the engine may still be working, and a retry would double
its load.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

UPSTREAM_HEADERS = {"content-type": "application/json"}
RETRYABLE_STATUSES = frozenset({502, 503})
DONE_EVENT = b"data: [DONE]\n\n"
EVENT_SEPARATOR = b"\n\n"


class UpstreamFailure(Exception):
    """An attempt that failed before any byte reached the client."""

    def __init__(self, reason: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.reason = reason  # small fixed set: connect, disconnect, timeout, status
        self.retryable = retryable


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    total_s: float

    def client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.total_s, sock_connect=self.connect_s, sock_read=self.first_byte_s)


def new_session() -> aiohttp.ClientSession:
    """The process's one session: unlimited pooled connections (the router's gates bound concurrency)."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, timeouts: Timeouts
) -> aiohttp.ClientResponse:
    """POST and return once the response headers are in; map failures to :class:`UpstreamFailure`."""
    try:
        resp = await session.post(url, data=body, headers=UPSTREAM_HEADERS, timeout=timeouts.client_timeout())
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure("connect", f"cannot connect to engine: {exc.os_error}", retryable=True) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamFailure("disconnect", f"engine closed the connection: {exc}", retryable=True) from None
    except TimeoutError:
        raise UpstreamFailure("timeout", "engine did not answer in time", retryable=False) from None
    if resp.status in RETRYABLE_STATUSES:
        resp.release()
        raise UpstreamFailure("status", f"engine answered {resp.status}", retryable=True)
    return resp


async def read_all(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body of a non-streamed response, with failures mapped like :func:`post`."""
    try:
        return await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise UpstreamFailure("disconnect", f"engine broke off its response: {exc}", retryable=True) from None
    except TimeoutError:
        raise UpstreamFailure("timeout", "engine stopped sending its response", retryable=False) from None
    finally:
        resp.release()


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Complete SSE events (each ending in a blank line) as soon as they arrive; a trailing partial
    event is yielded as is. Connection errors propagate as aiohttp exceptions."""
    pending = b""
    async for chunk in resp.content.iter_any():
        pending += chunk
        end = pending.find(EVENT_SEPARATOR)
        while end >= 0:
            yield pending[: end + 2]
            pending = pending[end + 2 :]
            end = pending.find(EVENT_SEPARATOR)
    if pending.strip():
        yield pending


def is_usage_event(event: bytes) -> bool:
    """The ``stream_options.include_usage`` chunk: no choices, only usage."""
    return b'"choices": []' in event or b'"choices":[]' in event


def usage_of(payload: bytes) -> dict[str, Any] | None:
    """The ``usage`` object of a response body or SSE event, if it carries one."""
    text = payload[6:] if payload.startswith(b"data: ") else payload
    try:
        usage = json.loads(text).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def error_event(message: str, *, code: str = "upstream_error") -> bytes:
    """A last SSE event carrying an error in the OpenAI shape, followed by ``[DONE]``."""
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + EVENT_SEPARATOR + DONE_EVENT
