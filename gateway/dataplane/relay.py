"""Relaying an engine's response to the client, one SSE event at a time, and noting what it carried.

The relay reads usage (prompt and completion tokens: the engine's own count, since one SSE event may carry
several tokens) and the times of the first and last streamed content event into an :class:`Outcome`, which the
router turns into metrics. When the client did not ask for the usage chunk, the router asked the engine for it
anyway and the relay does not forward it. A stream that ends cleanly with ``[DONE]`` is read to its end so its
connection goes back to the pool for reuse; any other end closes the connection, which cancels the request in the
engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import aiohttp

from gateway.dataplane.asgi import SSE_HEADERS, ClientDisconnected, Headers, Receive, Send, send_bytes
from gateway.dataplane.upstream import (
    DONE_EVENT,
    UpstreamFailure,
    error_event,
    is_usage_event,
    read_all,
    sse_events,
    usage_of,
)

logger = logging.getLogger("tpgate.router")

STREAM_BROKEN = "502"  # status recorded for a stream that broke after it started


@dataclass
class Outcome:
    """What one proxied request ended as, for the metrics."""

    pool: str = "none"
    status: str = "500"
    first_token_at: float | None = None
    last_token_at: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    content_events: int = 0  # streamed events that carried output (fallback count when the engine sends no usage)
    started: bool = False  # the response's status line went to the client: an error can only end its body now


@dataclass(frozen=True)
class RelayOptions:
    """How to relay one response: headers to add, whether the client wants the usage chunk, timeouts (seconds;
    ``first_byte_deadline`` in event-loop time)."""

    headers: Headers
    forward_usage: bool
    first_byte_deadline: float
    idle_s: float


async def relay_whole(resp: aiohttp.ClientResponse, send: Send, outcome: Outcome, options: RelayOptions) -> None:
    """Forward a complete (non-streamed or error) response, reading its usage."""
    status = resp.status
    content_type = resp.headers.get("content-type", "application/json").encode()
    data = await read_all(resp, idle_s=options.idle_s)
    outcome.status = str(status)
    outcome.started = True
    if status == 200:
        usage = usage_of(data) or {}
        outcome.output_tokens = int(usage.get("completion_tokens") or 0)
        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    await send_bytes(send, status, data, [(b"content-type", content_type), *options.headers])


async def relay_stream(resp: aiohttp.ClientResponse, send: Send, outcome: Outcome, options: RelayOptions) -> None:
    """Forward an SSE stream. Until its first event arrives a failure is an :class:`UpstreamFailure` (the
    caller may retry); after that the stream ends with an error event and ``[DONE]`` instead."""
    events = sse_events(resp)
    clean = False
    try:
        try:
            async with asyncio.timeout_at(options.first_byte_deadline):
                first = await anext(events)
        except StopAsyncIteration:
            raise UpstreamFailure("disconnect", "engine closed the stream before its first event",
                                  retryable=True) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            raise UpstreamFailure("disconnect", f"engine broke off the stream: {exc}", retryable=True) from None
        except TimeoutError:
            raise UpstreamFailure("timeout", "engine sent no first event in time", retryable=False) from None
        # committed: from here on the client has bytes, so failures end the stream instead of retrying
        outcome.status = "200"
        outcome.started = True
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *options.headers]})
        clean = await _pump(first, events, send, outcome, options)
        if not clean:
            outcome.status = STREAM_BROKEN
            await send({"type": "http.response.body", "body": error_event("the engine stream ended early"),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        if clean:
            resp.release()  # read to its end: the connection goes back to the pool
        else:
            resp.close()  # unread: drops the connection, which cancels the request in the engine


async def _pump(
    first: bytes, events: AsyncIterator[bytes], send: Send, outcome: Outcome, options: RelayOptions
) -> bool:
    """Forward events as they arrive; True when the engine ended with ``[DONE]`` and closed its body."""
    loop = asyncio.get_running_loop()
    event = first
    try:
        async with asyncio.timeout(None) as idle:
            while True:
                if event == DONE_EVENT or event.startswith(b"data: [DONE]"):
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                    idle.reschedule(loop.time() + options.idle_s)
                    async for _ in events:  # the engine ends its body right after [DONE]
                        pass
                    return True
                if is_usage_event(event):
                    usage = usage_of(event) or {}
                    outcome.output_tokens = int(usage.get("completion_tokens") or 0)
                    outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    if options.forward_usage:
                        await send({"type": "http.response.body", "body": event, "more_body": True})
                else:
                    if event.startswith(b"data:"):
                        now = time.perf_counter()
                        if outcome.first_token_at is None:
                            outcome.first_token_at = now
                        outcome.last_token_at = now
                        outcome.content_events += 1
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                idle.reschedule(loop.time() + options.idle_s)
                event = await anext(events)
                idle.reschedule(None)
    except StopAsyncIteration:
        return False
    except (aiohttp.ClientError, TimeoutError) as exc:
        logger.warning("engine stream broke: %s", exc or type(exc).__name__)
        return False


async def until_disconnect(receive: Receive, work: Awaitable[None]) -> None:
    """Await ``work`` in this task; if the client disconnects first, cancel it (which closes the upstream
    request) and raise :class:`ClientDisconnected`. One watcher task per request, nothing more."""
    current = asyncio.current_task()
    assert current is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        current.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not disconnected:
            raise
        current.uncancel()
        raise ClientDisconnected from None
    finally:
        watcher.cancel()  # before any other await, so it can never cancel what runs after the request
