"""The OpenAI-compatible wire protocol of LMDeploy 0.18's ``api_server``: request validation and response bodies.

Pure code (no aiohttp). A request goes through LMDeploy's stages in LMDeploy's order: the JSON body, the
pydantic model (:mod:`~gateway.engines.sim.request_models`, lax types as LMDeploy's), the endpoint's checks
(:mod:`~gateway.engines.sim.request_checks`), then per prompt the "tokenizer" (:mod:`~gateway.engines.sim.text`),
the context length and the output budget. Every refusal is an :class:`~gateway.errors.ApiError` with LMDeploy's
status (400, or 404 for an unknown model) and message, plus the field at fault in ``param``. Where LMDeploy's
own message would come from deep inside a chat template ("Request preprocessing failed."), the simulator names
the field instead.

Choices, as LMDeploy 0.18 serves them:

- ``/v1/chat/completions`` with ``n`` > 1 (up to 128): ``n`` independent generations of the same prompt, each
  its own sequence in the engine; ``usage`` counts the prompt once and the output of every choice.
- ``/v1/completions``: one choice per prompt (``prompt`` may be a list of strings; an empty list gives no
  choices); ``n`` is accepted and ignored. ``usage`` adds up every prompt and every output. Streamed, the
  prompts are generated one after another, as LMDeploy streams them; not streamed, all at once.
- Without ``max_tokens`` / ``max_completion_tokens`` a choice may run to the end of the session (both endpoints).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.engines.sim import request_checks as checks
from gateway.engines.sim.request_checks import ServingContext
from gateway.engines.sim.request_models import ChatCompletionRequest, CompletionRequest, StreamOptions
from gateway.engines.sim.text import (
    IMAGE_TOKENS,
    GenerationPlan,
    chat_prompt_tokens,
    completion_prompt_tokens,
    filler_text,
    plan_generation,
)
from gateway.errors import ApiError

__all__ = [
    "SSE_DONE",
    "ChoiceDelta",
    "ChoicePlan",
    "GenerationRequest",
    "ResponseWriter",
    "ServingContext",
    "check_content_type",
    "parse_chat",
    "parse_completion",
    "parse_json_body",
    "sse",
]

_Model = TypeVar("_Model", bound=BaseModel)
# Content block types LMDeploy treats as multimodal input; each counts as one image here.
MULTIMODAL_TYPES = frozenset({
    "image_url", "image_data", "image", "video_url", "video", "audio_url", "audio", "time_series_url", "time_series",
})
# Parts of a pydantic error location that name a union member rather than a field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


@dataclass(frozen=True)
class ChoicePlan:
    """One choice: one sequence in the engine."""

    prompt_tokens: int
    plan: GenerationPlan

    @property
    def text(self) -> str:
        """The whole generated text of this choice."""
        return filler_text(0, self.plan.output_tokens, limit_chars=self.plan.text_chars)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, reduced to what the engine needs."""

    kind: Literal["chat", "completion"]
    model: str
    choices: tuple[ChoicePlan, ...]
    stream: bool
    include_usage: bool

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens as ``usage`` reports them: a chat prompt once for all its choices, every completion
        prompt."""
        if self.kind == "chat":
            return self.choices[0].prompt_tokens if self.choices else 0
        return sum(choice.prompt_tokens for choice in self.choices)

    @property
    def streams_one_choice_at_a_time(self) -> bool:
        """LMDeploy streams the prompts of a completion request one after another; chat choices run together."""
        return self.kind == "completion" and self.stream


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


def check_content_type(content_type: str | None) -> None:
    """LMDeploy serves the generation endpoints only to ``Content-Type: application/json`` (parameters allowed)."""
    media_type = (content_type or "").split(";", maxsplit=1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(400, "Unsupported Media Type: Only 'application/json' is allowed")


def parse_chat(body: bytes, context: ServingContext) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body."""
    raw = parse_json_body(body)
    request = _validate(ChatCompletionRequest, raw)
    checks.check_chat(request, raw, context)
    if request.messages:
        pieces = _chat_pieces(request.messages, context)
        prompt_tokens = chat_prompt_tokens(pieces)
        key = "\n".join(text for texts, _ in pieces for text in texts)
    else:  # token ids instead of messages: no chat template
        assert request.input_ids is not None, "check_chat requires input_ids when messages is empty"
        images = _image_count(request.image_data, context)
        prompt_tokens = len(request.input_ids) + images * IMAGE_TOKENS
        key = ",".join(str(token) for token in request.input_ids)
    checks.check_context_length(prompt_tokens, context, param="messages" if request.messages else "input_ids")
    max_new = _max_new_tokens(request.max_completion_tokens, request.max_tokens, prompt_tokens, context)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    choices = tuple(
        ChoicePlan(prompt_tokens, _plan(max_new, request.ignore_eos, stop, _choice_key(key, index)))
        for index in range(request.n or 1)
    )
    return _finish("chat", request.model, choices, request.stream, request.stream_options)


def parse_completion(body: bytes, context: ServingContext) -> GenerationRequest:
    """Validate a ``/v1/completions`` body."""
    request = _validate(CompletionRequest, parse_json_body(body))
    checks.check_completion(request, context)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    choices = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            got = json.dumps(prompt)[:80]
            raise checks.reject("prompt", f"prompt.{index}: Input should be a valid string (got {got})")
        prompt_tokens = completion_prompt_tokens(prompt)
        checks.check_context_length(prompt_tokens, context, param="prompt")
        max_new = _max_new_tokens(request.max_completion_tokens, request.max_tokens, prompt_tokens, context)
        choices.append(ChoicePlan(prompt_tokens, _plan(max_new, request.ignore_eos, stop, prompt)))
    return _finish("completion", request.model, tuple(choices), request.stream, request.stream_options)


def _validate(model: type[_Model], data: dict[str, Any]) -> _Model:
    """The pydantic stage. LMDeploy reports the first error as ``location: message``; so does the simulator."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = ".".join(str(part) for part in error["loc"])
        param = ".".join(str(part) for part in error["loc"] if not _is_type_tag(part))
        message = f"{location}: {error['msg']}" if location else error["msg"]
        raise ApiError(400, message, param=param or None) from None


def _is_type_tag(part: str | int) -> bool:
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def _chat_pieces(messages: list[dict[str, Any]], context: ServingContext) -> list[tuple[list[str], int]]:
    """Each message's text pieces and number of images, as LMDeploy's template stage reads them: multimodal input
    to a text-only model is refused before any message is rendered."""
    if not context.multimodal and any(
        isinstance(part, dict) and part.get("type") in MULTIMODAL_TYPES
        for message in messages if isinstance(message.get("content"), list)
        for part in message["content"]
    ):
        raise checks.reject("messages", "Multimodal input is not supported by this model.")
    return [_message_pieces(index, message) for index, message in enumerate(messages)]


def _message_pieces(index: int, message: dict[str, Any]) -> tuple[list[str], int]:
    where = f"messages.{index}"
    if "role" not in message:
        raise checks.reject(f"{where}.role", f"{where}.role: Field required")
    if not isinstance(message["role"], str):
        raise checks.reject(f"{where}.role", f"{where}.role: Input should be a valid string")
    content = message.get("content")
    if content is None:
        return [], 0
    if isinstance(content, str):
        return [content], 0
    if not isinstance(content, list):
        raise checks.reject(f"{where}.content", f"{where}.content: Input should be a valid string or list of parts")
    texts: list[str] = []
    images = 0
    for part_index, part in enumerate(content):
        if not isinstance(part, dict):
            continue  # LMDeploy skips content blocks that are not objects
        if part.get("type") == "text":
            text = part.get("text", "")
            if not isinstance(text, str):
                param = f"{where}.content.{part_index}.text"
                raise checks.reject(param, f"{param}: Input should be a valid string")
            texts.append(text)
        elif part.get("type") in MULTIMODAL_TYPES:
            images += 1
    return texts, images


def _image_count(image_data: str | dict[Any, Any] | list[Any] | None, context: ServingContext) -> int:
    if image_data is None:
        return 0
    if not context.multimodal:
        raise checks.reject("image_data", "Multimodal input is not supported by this model.")
    return len(image_data) if isinstance(image_data, list) else 1


def _max_new_tokens(
    max_completion_tokens: int | None, max_tokens: int | None, prompt_tokens: int, context: ServingContext
) -> int:
    """Tokens a choice may generate: ``max_completion_tokens``, else ``max_tokens``, else the rest of the
    session; the engine stops at the session's end in any case."""
    field = "max_completion_tokens" if max_completion_tokens is not None else "max_tokens"
    requested = max_completion_tokens if max_completion_tokens is not None else max_tokens
    checks.check_max_new_tokens(requested, param=field)
    room = context.session_len - prompt_tokens
    return room if requested is None else min(requested, room)


def _plan(max_new_tokens: int, ignore_eos: bool | None, stop: list[str], prompt_key: str) -> GenerationPlan:
    return plan_generation(max_new_tokens=max_new_tokens, ignore_eos=bool(ignore_eos), stop=stop,
                           prompt_key=prompt_key)


def _choice_key(prompt_key: str, index: int) -> str:
    """Each choice samples on its own, so each stops at its own natural length; choice 0 is the plain prompt."""
    return prompt_key if index == 0 else f"{prompt_key}\x1fchoice {index}"


def _finish(
    kind: Literal["chat", "completion"],
    model: str,
    choices: tuple[ChoicePlan, ...],
    stream: bool | None,
    stream_options: StreamOptions | None,
) -> GenerationRequest:
    include_usage = bool(stream_options is not None and stream_options.include_usage)
    return GenerationRequest(kind, model, choices, bool(stream), include_usage)


class ChoiceDelta(NamedTuple):
    """What one streamed event carries for one choice (a tuple: one is made per token on the hot path)."""

    choice_index: int
    text: str
    finish_reason: str | None = None


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
        """``completion_tokens``: of every choice together."""
        prompt = self.request.prompt_tokens
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion_tokens,
                "completion_tokens": completion_tokens}

    def response(self) -> dict[str, Any]:
        """The non-streamed response, every choice complete."""
        choices = []
        for index, choice in enumerate(self.request.choices):
            reason = choice.plan.finish_reason
            if self.request.kind == "chat":
                message = {"role": "assistant", "content": choice.text, "reasoning_content": None, "tool_calls": None}
                choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": choice.text, "logprobs": None, "finish_reason": reason})
        completion_tokens = sum(choice.plan.output_tokens for choice in self.request.choices)
        return {
            "id": self.id, "object": self._object, "created": self.created, "model": self.request.model,
            "choices": choices, "usage": self.usage(completion_tokens),
        }

    def chunk(self, deltas: list[ChoiceDelta]) -> dict[str, Any]:
        """One streamed event: the choices that made progress since the last one, by index."""
        choices = []
        for delta in sorted(deltas) if len(deltas) > 1 else deltas:
            if self.request.kind == "chat":
                choices.append({"index": delta.choice_index, "delta": {"role": "assistant", "content": delta.text},
                                "logprobs": None, "finish_reason": delta.finish_reason})
            else:
                choices.append({"index": delta.choice_index, "text": delta.text, "logprobs": None,
                                "finish_reason": delta.finish_reason})
        return {
            "id": self.id, "object": self._chunk_object, "created": self.created, "model": self.request.model,
            "choices": choices, "usage": None,
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
