"""Talking to engines: one aiohttp session per process, explicit timeouts, SSE events split as they arrive.

An attempt fails *before commitment* (nothing sent to the client yet) with :class:`UpstreamFailure`; the
router may then retry on another replica. What counts as retryable: the connection could not be made (refused,
or not made within the connect timeout: nothing was sent), or it broke before the response (or, when streaming,
before its first event) arrived, or the engine answered 502/503. A first-byte timeout is not retried: the engine
may still be working, and a retry would double its load.

Three timeouts, each its own setting (:class:`Timeouts`): connecting, the first byte (the response headers and,
when streaming, the first event), and the idle time between streamed events after that; plus an overall cap.
"""

from __future__ import annotations

import asyncio
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
    """Seconds: to connect, to the first byte, between streamed events after it, and for the whole request."""

    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float

    def client_timeout(self) -> aiohttp.ClientTimeout:
        # the first-byte and idle limits are enforced by the caller around each read (asyncio.Timeout)
        return aiohttp.ClientTimeout(total=self.total_s, sock_connect=self.connect_s, connect=self.connect_s)


def new_session() -> aiohttp.ClientSession:
    """The process's one session: unlimited pooled connections (the router's gates bound concurrency)."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, timeouts: Timeouts, *, first_byte_deadline: float,
    api_key: str | None = None,
) -> aiohttp.ClientResponse:
    """POST and return once the response headers are in (by ``first_byte_deadline``, loop time); map failures
    to :class:`UpstreamFailure`. ``api_key``: the pool's engine key, where its engines require one."""
    headers = UPSTREAM_HEADERS if api_key is None else {**UPSTREAM_HEADERS, "authorization": f"Bearer {api_key}"}
    try:
        async with asyncio.timeout_at(first_byte_deadline):
            resp = await session.post(url, data=body, headers=headers, timeout=timeouts.client_timeout())
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamFailure("connect", f"no connection to the engine within {timeouts.connect_s:g} s",
                              retryable=True) from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure("connect", f"cannot connect to engine: {exc.os_error}", retryable=True) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamFailure("disconnect", f"engine closed the connection: {exc}", retryable=True) from None
    except TimeoutError:
        raise UpstreamFailure("timeout", f"engine sent no response within {timeouts.first_byte_s:g} s",
                              retryable=False) from None
    if resp.status in RETRYABLE_STATUSES:
        resp.release()
        raise UpstreamFailure("status", f"engine answered {resp.status}", retryable=True)
    if resp.status == 401:  # the engine wants a key the gateway did not send or another one: not the client's doing
        resp.release()
        raise UpstreamFailure("status", "engine refused the gateway's engine key (401)", retryable=True)
    return resp


async def read_all(resp: aiohttp.ClientResponse, *, idle_s: float) -> bytes:
    """The whole body of a non-streamed response, with failures mapped like :func:`post`."""
    try:
        async with asyncio.timeout(idle_s):
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


def with_usage_requested(payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A streamed request's payload asking the engine for the usage chunk, and whether the client asked for it
    itself. The gateway counts tokens from the engine's ``usage`` (an SSE event may carry several tokens), and
    strips the chunk again when the client did not ask for it."""
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return payload, True  # malformed: the engine answers 400, the gateway changes nothing
    if options is not None and options.get("include_usage") is True:
        return payload, True
    return {**payload, "stream_options": {**(options or {}), "include_usage": True}}, False


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
