"""The request bodies of LMDeploy 0.18's OpenAI endpoints, as pydantic models with the same fields and types.

LMDeploy validates a request body with pydantic's default (lax) mode against these shapes before anything
else runs, so the simulator declares every field LMDeploy declares, with the same type, default and order:
a value LMDeploy's model refuses is refused here too, and the first failing field (pydantic reports fields
in declaration order) is the one LMDeploy names. Unknown fields are ignored, as LMDeploy ignores them.

Most fields change nothing in the simulation (sampling parameters, tool definitions, output formats); they
are declared so that their types are checked the way LMDeploy checks them. The range checks LMDeploy applies
after the model (``temperature`` within [0, 2], ``n`` up to 128, ...) live in
:mod:`gateway.engines.sim.request_checks`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class Function(BaseModel):
    description: str | None = None
    name: str
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: str = "function"
    function: Function


class ToolChoiceFunctionName(BaseModel):
    name: str


class ToolChoice(BaseModel):
    function: ToolChoiceFunctionName
    type: Literal["function"] = "function"


class AllowedTools(BaseModel):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolChoice(BaseModel):
    type: Literal["allowed_tools"] = "allowed_tools"
    allowed_tools: AllowedTools


class JsonSchema(BaseModel):
    # OpenAI's key is `schema`, which pydantic's BaseModel reserves; LMDeploy reads it through an alias too.
    model_config = ConfigDict(serialize_by_alias=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema", "regex_schema"]
    json_schema: JsonSchema | None = None
    regex_schema: str | None = None


# An image as a URL or base64 string, or a dict {"url": ..., "options": ...}; one or a list of them.
ImageItem = str | dict[Any, Any]
ImageData = ImageItem | list[ImageItem]


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: LMDeploy 0.18's fields, types and defaults, in its order."""

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | AllowedToolChoice | Literal["auto", "required", "none"] = "auto"
    parallel_tool_calls: bool | None = True
    logprobs: bool | None = False
    top_logprobs: int | None = None
    n: int | None = 1
    logit_bias: dict[str, float] | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    user: str | None = None
    reasoning_effort: Literal["low", "medium", "high", "max"] | None = None
    response_format: ResponseFormat | None = None
    repetition_penalty: float | None = None
    repetition_ngram_size: int = Field(default=0, ge=0)
    repetition_ngram_threshold: int = Field(default=0, ge=0)
    session_id: int | None = -1
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    top_k: int | None = None
    seed: int | None = None
    min_new_tokens: int | None = None
    min_p: float | None = None
    enable_thinking: bool | None = None
    return_token_ids: bool | None = False
    return_logprob: bool | None = False
    include_stop_str_in_output: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    input_ids: list[int] | None = None  # used only when `messages` is empty
    image_data: ImageData | None = None  # used only with `input_ids`
    return_routed_experts: bool | None = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``: LMDeploy 0.18's fields, types and defaults, in its order."""

    model: str
    prompt: str | list[Any]
    suffix: str | None = None
    temperature: float | None = None
    n: int | None = 1
    logprobs: int | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_p: float | None = None
    echo: bool | None = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    user: str | None = None
    repetition_penalty: float | None = None
    repetition_ngram_size: int = Field(default=0, ge=0)
    repetition_ngram_threshold: int = Field(default=0, ge=0)
    session_id: int | None = -1
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    top_k: int | None = None
    seed: int | None = None
    min_p: float | None = None
