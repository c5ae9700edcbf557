"""Reading an OpenAI response as it arrives: server-sent events in, token timings and counts out.

Pure: the caller reads lines off the socket and passes each with the time it arrived, so the parsing is tested
with plain strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

DATA_PREFIX = "data:"
DONE = "[DONE]"


@dataclass
class StreamTally:
    """What one streamed response delivered so far. Times are the caller's clock, in seconds."""

    api: Literal["chat", "completions"]
    first_token_s: float | None = None
    last_token_s: float | None = None
    content_chunks: int = 0
    usage_output_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    done: bool = False
    error: str | None = None

    def feed_line(self, line: str, now_s: float) -> None:
        """One line of the SSE body (without or with its newline)."""
        line = line.strip()
        if not line.startswith(DATA_PREFIX):
            return  # blank separators, comments (":"), "event:" and "id:" lines carry no tokens
        payload = line.removeprefix(DATA_PREFIX).strip()
        if payload == DONE:
            self.done = True
            return
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            self.error = f"malformed SSE event: {payload[:80]!r}"
            return
        if not isinstance(event, dict):
            self.error = f"malformed SSE event: {payload[:80]!r}"
        elif "error" in event:
            self.error = error_message(event)
        else:
            self._feed_event(event, now_s)

    def _feed_event(self, event: dict[str, Any], now_s: float) -> None:
        if _content(event, self.api):
            self.content_chunks += 1
            if self.first_token_s is None:
                self.first_token_s = now_s
            self.last_token_s = now_s
        usage = event.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            self.usage_output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            self.usage_prompt_tokens = int(usage["prompt_tokens"])

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the usage report when the server sent one, else one per content chunk."""
        return self.usage_output_tokens if self.usage_output_tokens is not None else self.content_chunks

    def failure(self) -> str | None:
        """Why the stream counts as failed, or None."""
        if self.error is not None:
            return self.error
        if not self.done:
            return "stream ended before data: [DONE]"
        return None


def parse_response(body: Any) -> tuple[int, int | None, str | None]:
    """A non-streamed response: (output tokens, prompt tokens or None, error message or None).

    The token counts come from ``usage``; a response without it counts 0 output tokens.
    """
    if not isinstance(body, dict):
        return 0, None, "response body is not a JSON object"
    if "error" in body:
        return 0, None, error_message(body)
    usage = body.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens")
    output_tokens = usage.get("completion_tokens")
    if not body.get("choices"):
        return 0, prompt_tokens, "response has no choices"
    return int(output_tokens or 0), (None if prompt_tokens is None else int(prompt_tokens)), None


def error_message(body: dict[str, Any]) -> str:
    """The message of an OpenAI error object (``{"error": {"message": ...}}``), or the object itself."""
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return json.dumps(body)[:200]


def _content(event: dict[str, Any], api: str) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if api == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""
