"""Tiny ASGI helpers for the router's hot path: read a bounded body, send a complete JSON response.

The router is a raw ASGI app rather than a framework app so that one request costs one Python hop with
as little machinery as possible (DESIGN.md: every in-path hop costs real milliseconds).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

from gateway.errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class ClientDisconnected(Exception):
    """The client went away while its request body was being read."""


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a request header (``name`` in lowercase), decoded as latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(scope: Scope, receive: Receive, *, limit_bytes: int, timeout_s: float) -> bytes:
    """The whole request body: 413 beyond ``limit_bytes`` (checked against Content-Length before any byte is read,
    then as chunks arrive), 408 when the whole body has not arrived within ``timeout_s`` seconds, so a client that
    trickles its body (slow loris) cannot hold a router slot for ever."""
    declared = header(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length must be a decimal number of bytes")
        if int(declared) > limit_bytes:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit_bytes}")
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_chunks(receive, limit_bytes)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s") from None


async def _read_chunks(receive: Receive, limit_bytes: int) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise ApiError(413, f"request body exceeds the limit of {limit_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = JSON_HEADERS
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: Any, *, extra_headers: Iterable[tuple[str, str]] = ()) -> None:
    headers = JSON_HEADERS + [(k.lower().encode(), v.encode()) for k, v in extra_headers]
    await send_bytes(send, status, json.dumps(payload).encode(), headers)


async def send_error(send: Send, error: ApiError, *, extra_headers: Iterable[tuple[str, str]] = ()) -> None:
    await send_json(send, error.status, error.body(), extra_headers=[*error.headers.items(), *extra_headers])
