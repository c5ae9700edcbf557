"""The OpenAI-compatible wire protocol of LMDeploy 0.18's ``api_server``: request validation and response bodies.

Pure code (no aiohttp). Every bad request becomes an :class:`~gateway.errors.ApiError` with a message that
names the field and the bad value: 400 for malformed or unsupported input, 404 for an unknown model.
Fields the simulator accepts but ignores (sampling parameters, ``user``, ``seed``, ...) are type-checked
the way LMDeploy's pydantic models check them, and otherwise pass.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from gateway.engines.sim.text import (
    GenerationPlan,
    chat_prompt_tokens,
    completion_prompt_tokens,
    plan_generation,
)
from gateway.errors import ApiError

Number = StrictInt | StrictFloat
_Model = TypeVar("_Model", bound=BaseModel)
_UNION_TAGS = {"str", "int", "float", "bool"}
# Default output budget of /v1/completions when the request sets none (OpenAI's and LMDeploy's default).
COMPLETION_DEFAULT_MAX_TOKENS = 16


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = False


class ContentPart(_Lenient):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Lenient):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None


class _GenerationRequest(_Lenient):
    model: StrictStr
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    ignore_eos: StrictBool | None = False
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: StrictStr | Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionRequest(_GenerationRequest):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, reduced to what the engine needs."""

    kind: Literal["chat", "completion"]
    model: str
    prompt_tokens: int
    plan: GenerationPlan
    stream: bool
    include_usage: bool


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ApiError(400, f"request body is not valid JSON: {exc.msg} at {where}") from None
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: not UTF-8 ({exc.reason})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(data).__name__}")
    return data


def parse_chat(body: bytes, *, served_model: str, session_len: int) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body."""
    request = _validate(ChatCompletionRequest, parse_json_body(body))
    if isinstance(request.messages, str):
        pieces: list[tuple[list[str], int]] = [([request.messages], 0)]
        key = request.messages
    else:
        pieces = [_message_pieces(m) for m in request.messages]
        key = "\n".join(t for texts, _ in pieces for t in texts)
    return _finish(request, "chat", chat_prompt_tokens(pieces), key, None, served_model, session_len)


def parse_completion(body: bytes, *, served_model: str, session_len: int) -> GenerationRequest:
    """Validate a ``/v1/completions`` body."""
    request = _validate(CompletionRequest, parse_json_body(body))
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    return _finish(
        request, "completion", completion_prompt_tokens(prompt), prompt, COMPLETION_DEFAULT_MAX_TOKENS,
        served_model, session_len,
    )


def _validate(model: type[_Model], data: dict[str, Any]) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # A union reports one error per member; the deepest one, and one that is not a plain type mismatch
        # with another member, says most about what is wrong.
        error = max(exc.errors(), key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
        where = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part))
        if error["type"] == "missing":
            raise ApiError(400, f"missing required field '{where}'", param=where) from None
        if where == "prompt" and error["type"] == "too_long":
            raise ApiError(400, "batched prompts are not supported: send one prompt per request", param=where) from None
        got = json.dumps(error.get("input"))[:80]
        raise ApiError(400, f"invalid value for '{where}': {error['msg']} (got {got})", param=where) from None


def _is_union_tag(part: str | int) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-"))


def _message_pieces(message: ChatMessage) -> tuple[list[str], int]:
    if message.content is None:
        return [], 0
    if isinstance(message.content, str):
        return [message.content], 0
    texts = [part.text or "" for part in message.content if part.type == "text"]
    images = sum(1 for part in message.content if part.type == "image_url")
    return texts, images


def _finish(
    request: _GenerationRequest,
    kind: Literal["chat", "completion"],
    prompt_tokens: int,
    prompt_key: str,
    default_max_tokens: int | None,
    served_model: str,
    session_len: int,
) -> GenerationRequest:
    if request.model != served_model:
        raise ApiError(404, f"The model '{request.model}' does not exist.", param="model", code="model_not_found")
    if request.n not in (None, 1):
        raise ApiError(400, f"n={request.n} is not supported: the engine returns one choice per request", param="n")
    if prompt_tokens + 1 > session_len:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens; with at least one generated token it exceeds the session "
            f"length of {session_len} tokens",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if requested is None:
        requested = default_max_tokens
    if requested is not None and requested < 1:
        raise ApiError(400, f"{field} must be at least 1, not {requested}", param=field)
    if requested is not None and requested > session_len:
        raise ApiError(400, f"{field}={requested} exceeds the session length of {session_len} tokens", param=field)
    room = session_len - prompt_tokens
    max_new = room if requested is None else min(requested, room)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    ignore_eos = bool(request.ignore_eos)
    plan = plan_generation(max_new_tokens=max_new, ignore_eos=ignore_eos, stop=stop, prompt_key=prompt_key)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return GenerationRequest(kind, request.model, prompt_tokens, plan, bool(request.stream), include_usage)


class ResponseWriter:
    """Builds the JSON bodies of one request's response (LMDeploy 0.18 field names and objects)."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        chat = request.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = self.request.prompt_tokens
        total = prompt + completion_tokens
        return {"prompt_tokens": prompt, "total_tokens": total, "completion_tokens": completion_tokens}

    def response(self, text: str, completion_tokens: int) -> dict[str, Any]:
        reason = self.request.plan.finish_reason
        if self.request.kind == "chat":
            message = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            "id": self.id, "object": self._object, "created": self.created, "model": self.request.model,
            "choices": [choice], "usage": self.usage(completion_tokens),
        }

    def chunk(self, text: str, *, finish_reason: str | None = None) -> dict[str, Any]:
        if self.request.kind == "chat":
            delta = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id, "object": self._chunk_object, "created": self.created, "model": self.request.model,
            "choices": [choice], "usage": None,
        }

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        return {
            "id": self.id, "object": self._chunk_object, "created": self.created, "model": self.request.model,
            "choices": [], "usage": self.usage(completion_tokens),
        }


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
