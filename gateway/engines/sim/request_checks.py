"""The checks LMDeploy 0.18's ``api_server`` applies to a request after its pydantic model accepted it.

Pure code. Each check raises :class:`~gateway.errors.ApiError` with LMDeploy's status and message and, as
tpgate adds, the request field at fault in ``param``. The order is LMDeploy's, so a request with several
faults is refused for the same one:

1. the model name (404 when the engine does not serve it);
2. the endpoint's ``check_request``: logprobs (the PyTorch engine only: TurboMind has no ``logprobs_mode`` and
   LMDeploy skips the check there), ``n``, sampling ranges, token limits, ``messages`` / ``input_ids``, tools;
3. what the endpoint does before generating: ``logit_bias`` token ids, and the sampling ranges of LMDeploy's
   ``GenerationConfig`` (on ``/v1/completions``, ``min_p`` is checked only there);
4. per prompt, after tokenizing (:mod:`gateway.engines.sim.protocol`): the context length, then
   ``max_new_tokens`` of at least 1.

Two requests that LMDeploy 0.18 fails with an internal error (HTTP 500) are answered 400 here, with the
message of the matching check: ``n: null`` and ``min_p`` outside [0, 1] on ``/v1/completions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.engines.sim.request_models import ChatCompletionRequest, CompletionRequest
from gateway.errors import ApiError
from gateway.planner.knobs import Backend

# LMDeploy serves n > 1 on /v1/chat/completions as n independent generations, at most this many.
MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20
# Keys of a raw request body that ask for disaggregated prefill/decode (KV-cache migration).
CACHE_MIGRATION_KEYS = ("migration_request", "with_cache", "preserve_cache")


@dataclass(frozen=True)
class ServingContext:
    """What request validation needs to know about the engine that serves it."""

    served_model: str
    session_len: int  # tokens: prompt plus output must stay below it
    vocab_size: int  # token ids of logit_bias must be below it
    multimodal: bool  # whether the model has a vision encoder (image inputs)
    backend: Backend = "turbomind"


def reject(param: str, message: str, *, code: str | None = None) -> ApiError:
    """A 400 for ``param`` (callers raise it)."""
    return ApiError(400, message, param=param, code=code)


def check_model(model: str, context: ServingContext) -> None:
    if model != context.served_model:
        raise ApiError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")


def check_chat(request: ChatCompletionRequest, raw: dict[str, Any], context: ServingContext) -> None:
    """Stages 1 to 3 for ``/v1/chat/completions``; ``raw`` is the JSON body as sent."""
    check_model(request.model, context)
    if context.backend == "pytorch":
        top_logprobs = request.top_logprobs or 0
        if request.logprobs or top_logprobs > 0:
            raise reject(
                "logprobs" if request.logprobs else "top_logprobs",
                f"Logprobs({request.logprobs})/top_logprobs({top_logprobs}) requested but not enabled "
                "logprobs_mode in engine configuration",
            )
        if request.return_logprob:
            raise reject(
                "return_logprob",
                f"return_logprob({request.return_logprob}) requested but not enabled logprobs_mode in engine "
                "configuration.",
            )
    n = request.n
    if n is not None and n <= 0:
        raise reject("n", f"The n {n!r} must be a positive int.")
    if n is not None and n > MAX_CHOICES:
        raise reject("n", f"The n {n!r} exceeds the maximum supported choices ({MAX_CHOICES}).")
    if n is not None and n > 1 and request.session_id not in (None, -1):
        raise reject("n", "n > 1 cannot be used with an explicit session_id.")
    if n is not None and n > 1 and any(raw.get(key) for key in CACHE_MIGRATION_KEYS):
        raise reject("n", "n > 1 is not supported with cache migration.")
    _check_sampling(request.top_p, request.top_k, request.temperature)
    if request.min_p is not None and not 0 <= request.min_p <= 1:
        raise reject("min_p", f"The min_p {request.min_p!r} must be in [0, 1].")
    if request.max_completion_tokens is not None and request.max_completion_tokens <= 0:
        raise reject(
            "max_completion_tokens",
            f"The max_completion_tokens {request.max_completion_tokens!r} must be a positive integer.",
        )
    if request.max_tokens is not None and request.max_tokens <= 0:
        raise reject("max_tokens", f"The max_tokens {request.max_tokens!r} must be a positive integer.")
    if request.min_new_tokens is not None and request.min_new_tokens < 0:
        raise reject("min_new_tokens", f"The min_new_tokens {request.min_new_tokens!r} cannot be a negative integer.")
    if request.top_logprobs is not None and request.top_logprobs > MAX_TOP_LOGPROBS:
        raise reject("top_logprobs", f"The top_logprobs {request.top_logprobs!r} must be in [0, {MAX_TOP_LOGPROBS}].")
    _check_chat_inputs(request)
    if request.tool_choice == "required" and not request.tools:
        raise reject("tool_choice", '`tool_choice="required"` requires at least one tool.')
    if request.tool_choice != "none" and request.tools:
        # The simulator has no tool-call parser, like an api_server started without --tool-call-parser.
        raise reject("tools", "Please launch the api_server with --tool-call-parser if you want to use tools.")
    if request.return_routed_experts:
        if context.backend == "turbomind":
            raise reject("return_routed_experts", "return_routed_experts is not supported in TurbomindEngineConfig.")
        raise reject(
            "return_routed_experts",
            "routed experts requested but not configured in engine configuration. May start api_server with "
            "--enable-return-routed-experts flag.",
        )
    if request.logit_bias is not None:
        _check_logit_bias(request.logit_bias, context.vocab_size)


def check_completion(request: CompletionRequest, context: ServingContext) -> None:
    """Stages 1 to 3 for ``/v1/completions``. ``n`` is accepted but, as in LMDeploy, one choice per prompt comes
    back."""
    check_model(request.model, context)
    if context.backend == "pytorch":
        logprobs = request.logprobs or 0
        if logprobs > 0:
            raise reject(
                "logprobs",
                f"logprobs({logprobs}) requested but not enabled logprobs_mode in engine configuration.",
            )
    if request.n is None or request.n <= 0:
        raise reject("n", f"The n {request.n!r} must be a positive int.")
    _check_sampling(request.top_p, request.top_k, request.temperature)
    if request.min_p is not None and not 0 <= request.min_p <= 1:
        raise reject("min_p", f"The min_p {request.min_p!r} must be in [0, 1].")


def check_max_new_tokens(requested: int | None, *, param: str) -> None:
    """Stage 4, after the context length: LMDeploy refuses to generate nothing."""
    if requested is not None and requested < 1:
        raise reject(param, f"max_new_tokens must be at least 1, got {requested}.")


def check_context_length(prompt_tokens: int, context: ServingContext, *, param: str) -> None:
    """Stage 4: the prompt must leave room for at least one generated token."""
    if prompt_tokens >= context.session_len:
        raise reject(
            param,
            f"Input length ({prompt_tokens}) must be smaller than the model context length ({context.session_len}).",
            code="context_length_exceeded",
        )


def _check_sampling(top_p: float | None, top_k: int | None, temperature: float | None) -> None:
    if top_p is not None and not 0 < top_p <= 1:
        raise reject("top_p", f"The top_p {top_p!r} must be in (0, 1].")
    if top_k is not None and top_k < 0:
        raise reject("top_k", f"The top_k {top_k!r} cannot be a negative integer.")
    if temperature is not None and not 0 <= temperature <= 2:
        raise reject("temperature", f"The temperature {temperature!r} must be in [0, 2]")


def _check_chat_inputs(request: ChatCompletionRequest) -> None:
    """``messages`` takes priority; ``input_ids`` (and ``image_data`` with it) are used only when it is empty."""
    if request.messages:
        if request.input_ids is not None:
            raise reject("input_ids", "input_ids cannot be used when messages is non-empty. messages takes priority.")
        if request.image_data is not None:
            raise reject("image_data", "image_data cannot be used when messages is non-empty. messages takes priority.")
        return
    if request.image_data is not None and request.input_ids is None:
        raise reject("image_data", "image_data requires input_ids to be set when messages is empty.")
    if request.input_ids is None:
        raise reject("messages", "messages must not be empty unless input_ids is set.")
    if not request.input_ids:
        raise reject("input_ids", "The input_ids must not be an empty list.")


def _check_logit_bias(logit_bias: dict[str, float], vocab_size: int) -> None:
    # Every key is converted before any is range-checked, as LMDeploy does, so the same fault is reported.
    try:
        token_ids = [int(token) for token in logit_bias]
    except ValueError:
        raise reject(
            "logit_bias", "Found token_id in logit_bias that is not an integer or string representing an integer"
        ) from None
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise reject("logit_bias", f"token_id {token_id} in logit_bias contains out-of-vocab token id")
