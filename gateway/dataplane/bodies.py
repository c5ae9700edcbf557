"""Parsing a request body as a JSON object within the gateway's limits (pure).

Nesting is bounded before the body reaches an engine: Python's parser gives up with a ``RecursionError`` (not a
``ValueError``) somewhere near a thousand levels, and an engine's parser may do worse. The depth walk runs only
when the body holds more brackets than the limit, so an ordinary chat request costs two ``bytes.count`` calls.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import ApiError


def parse_json_object(body: bytes, *, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object; 400 when it is not JSON, not an object, or nests deeper than ``max_depth``."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise ApiError(400, f"request body nests deeper than the limit of {max_depth} levels") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object")
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(payload, stop_at=max_depth + 1) > max_depth:
        raise ApiError(400, f"request body nests deeper than the limit of {max_depth} levels")
    return payload


def json_depth(value: Any, *, stop_at: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), counted up to ``stop_at`` at most."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth >= stop_at:
            return depth
        deepest = max(deepest, depth)
        pending.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest
