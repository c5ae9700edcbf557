"""The contract: the simulated engine accepts and refuses requests as LMDeploy 0.18's ``api_server`` does.

The oracle is LMDeploy's own code, run on each request body of the table below, stage by stage as its
endpoints run them: the request's pydantic model, ``validate_request`` (the model name, then the endpoint's
``check_request``), ``logit_bias`` token ids (chat), and the ``GenerationConfig`` the endpoint builds. The engine
configuration is LMDeploy's own ``TurbomindEngineConfig`` or ``PytorchEngineConfig``; only the tokenizer
(its vocabulary size) and the engine (its model name) are stand-ins. For every body the simulator must reach
the same verdict; when both refuse, it must answer LMDeploy's status and message and name, in ``param``, the
field LMDeploy's message names. Where LMDeploy fails with an internal error (500) the simulator answers 400.

Rows marked ``later`` are refused by LMDeploy only after these stages (chat template, tokenizer, context
length), which need a model to run; there the test checks that LMDeploy's stages above accept the body, and
that the simulator refuses it, naming the field.

It imports ``lmdeploy`` (``make test`` installs it without a GPU); without it the tests are skipped with the
reason, unless ``REQUIRE_LMDEPLOY_CONTRACT=1`` (set by ``make test``) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import pytest
from pydantic import ValidationError

from gateway.engines.lmdeploy import LMDEPLOY_VERSION
from gateway.engines.sim.protocol import ServingContext, parse_chat, parse_completion
from gateway.errors import ApiError

MODEL = "sim-model"
VOCAB_SIZE = 32_000
SESSION_LEN = 4096
Endpoint = Literal["chat", "completion"]
BASES: dict[Endpoint, dict[str, Any]] = {
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    "completion": {"model": MODEL, "prompt": "hi"},
}
DELETE = object()  # a field value that removes the field from the base body


@dataclass(frozen=True)
class Case:
    """A request body: the endpoint's base body with ``fields`` laid over it."""

    endpoint: Endpoint
    fields: dict[str, Any]
    backend: Literal["turbomind", "pytorch"] = "turbomind"
    later: str | None = None  # the field LMDeploy refuses after the stages the oracle runs
    multimodal: bool = False

    def body(self) -> dict[str, Any]:
        merged = {**BASES[self.endpoint], **self.fields}
        return {key: value for key, value in merged.items() if value is not DELETE}


def chat(fields: dict[str, Any], **options: Any) -> Case:
    return Case("chat", fields, **options)


def completion(fields: dict[str, Any], **options: Any) -> Case:
    return Case("completion", fields, **options)


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
CASES: dict[str, Case] = {
    # --- chat: bodies LMDeploy serves ----------------------------------------------------------------------
    "chat-minimal": chat({}),
    "chat-n-2": chat({"n": 2}),
    "chat-n-128": chat({"n": 128}),
    "chat-n-null": chat({"n": None}),
    "chat-temperature-bounds": chat({"temperature": 0, "top_p": 1, "top_k": 0, "min_p": 1}),
    "chat-temperature-2": chat({"temperature": 2}),
    "chat-numeric-strings": chat({"max_tokens": "100", "temperature": "0.5"}),
    "chat-bool-words": chat({"stream": "yes", "ignore_eos": 1, "stream_options": {"include_usage": "true"}}),
    "chat-stream-usage": chat({"stream": True, "stream_options": {"include_usage": True}}),
    "chat-stream-options-without-stream": chat({"stream_options": {"include_usage": True}}),
    "chat-stop-list": chat({"stop": ["\n", "END"], "seed": 3, "user": "u1"}),
    "chat-limits-beyond-session": chat({"max_tokens": 10**9, "max_completion_tokens": 10**6}),
    "chat-unknown-fields": chat({"foo": 1, "metadata": {"a": "b"}, "store": True}),
    "chat-logprobs-turbomind": chat({"logprobs": True, "top_logprobs": 5}),
    "chat-session-id": chat({"session_id": 42}),
    "chat-input-ids": chat({"messages": [], "input_ids": [1, 2, 3]}),
    "chat-logit-bias": chat({"logit_bias": {"5": 10, "31999": -200}}),
    "chat-tools-none": chat({"tools": [TOOL], "tool_choice": "none"}),
    "chat-tool-choice-object": chat({"tool_choice": {"type": "function", "function": {"name": "lookup"}}}),
    "chat-allowed-tools": chat({"tool_choice": {"allowed_tools": {"mode": "auto", "tools": []}}}),
    "chat-response-format-schema": chat(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    ),
    "chat-response-format-text": chat({"response_format": {"type": "text"}}),
    "chat-reasoning-effort": chat({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}),
    "chat-content-parts": chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    "chat-image-vision-model": chat(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        multimodal=True,
    ),
    "chat-content-null": chat({"messages": [{"role": "assistant", "content": None}, {"role": "user"}]}),
    # --- chat: bodies LMDeploy refuses ---------------------------------------------------------------------
    "chat-messages-string": chat({"messages": "hi"}),
    "chat-messages-of-strings": chat({"messages": ["hi"]}),
    "chat-messages-missing": chat({"messages": DELETE}),
    "chat-messages-empty": chat({"messages": []}),
    "chat-model-missing": chat({"model": DELETE}),
    "chat-model-number": chat({"model": 5}),
    "chat-model-unknown": chat({"model": "gpt-4"}),
    "chat-model-unknown-and-bad-type": chat({"model": "gpt-4", "temperature": "hot"}),
    "chat-temperature-negative": chat({"temperature": -5}),
    "chat-temperature-high": chat({"temperature": 2.5}),
    "chat-temperature-text": chat({"temperature": "hot"}),
    "chat-top-p-zero": chat({"top_p": 0}),
    "chat-top-p-high": chat({"top_p": 1.5}),
    "chat-top-k-negative": chat({"top_k": -1}),
    "chat-min-p-high": chat({"min_p": 2}),
    "chat-n-0": chat({"n": 0}),
    "chat-n-negative": chat({"n": -1}),
    "chat-n-129": chat({"n": 129}),
    "chat-n-fraction": chat({"n": 1.5}),
    "chat-n-with-session": chat({"n": 2, "session_id": 5}),
    "chat-n-with-migration": chat({"n": 2, "preserve_cache": True}),
    "chat-max-tokens-0": chat({"max_tokens": 0}),
    "chat-max-tokens-negative": chat({"max_tokens": -5}),
    "chat-max-tokens-fraction": chat({"max_tokens": 1.5}),
    "chat-max-tokens-text": chat({"max_tokens": "ten"}),
    "chat-max-completion-tokens-0": chat({"max_completion_tokens": 0}),
    "chat-min-new-tokens-negative": chat({"min_new_tokens": -1}),
    "chat-top-logprobs-21": chat({"top_logprobs": 21}),
    "chat-stream-word": chat({"stream": "maybe"}),
    "chat-stream-options-string": chat({"stream_options": "usage"}),
    "chat-include-usage-word": chat({"stream": True, "stream_options": {"include_usage": "maybe"}}),
    "chat-stop-number": chat({"stop": 3}),
    "chat-stop-numbers": chat({"stop": [1, 2]}),
    "chat-input-ids-with-messages": chat({"input_ids": [1, 2]}),
    "chat-image-data-with-messages": chat({"image_data": "data:,"}),
    "chat-image-data-alone": chat({"messages": [], "image_data": "data:,"}),
    "chat-input-ids-empty": chat({"messages": [], "input_ids": []}),
    "chat-tools-need-a-parser": chat({"tools": [TOOL]}),
    "chat-tool-choice-required": chat({"tool_choice": "required"}),
    "chat-tool-without-name": chat({"tools": [{"function": {}}]}),
    "chat-tool-choice-word": chat({"tool_choice": "sometimes"}),
    "chat-response-format-unknown": chat({"response_format": {"type": "xml"}}),
    "chat-response-format-untyped": chat({"response_format": {}}),
    "chat-reasoning-effort-unknown": chat({"reasoning_effort": "extreme"}),
    "chat-routed-experts-turbomind": chat({"return_routed_experts": True}),
    "chat-logit-bias-word": chat({"logit_bias": {"abc": 1}}),
    "chat-logit-bias-out-of-vocab": chat({"logit_bias": {str(VOCAB_SIZE): 1}}),
    "chat-logit-bias-negative-id": chat({"logit_bias": {"-1": 1}}),
    "chat-logit-bias-text-value": chat({"logit_bias": {"1": "high"}}),
    "chat-ngram-negative": chat({"repetition_ngram_size": -1}),
    "chat-two-faults-first-field-wins": chat({"max_tokens": "ten", "temperature": "hot"}),
    "chat-logprobs-pytorch": chat({"logprobs": True}, backend="pytorch"),
    "chat-top-logprobs-pytorch": chat({"top_logprobs": 2}, backend="pytorch"),
    "chat-return-logprob-pytorch": chat({"return_logprob": True}, backend="pytorch"),
    "chat-routed-experts-pytorch": chat({"return_routed_experts": True}, backend="pytorch"),
    # --- chat: refused later, by the chat template or the context length ---------------------------------------
    "chat-message-without-role": chat({"messages": [{"content": "hi"}]}, later="messages"),
    "chat-content-number": chat({"messages": [{"role": "user", "content": 5}]}, later="messages"),
    "chat-image-text-only-model": chat(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        later="messages",
    ),
    "chat-beyond-context": chat({"messages": [{"role": "user", "content": "x" * 4 * SESSION_LEN}]}, later="messages"),
    # --- completions: bodies LMDeploy serves -------------------------------------------------------------------
    "completion-minimal": completion({}),
    "completion-prompt-list": completion({"prompt": ["a", "b", "c"]}),
    "completion-prompt-empty-list": completion({"prompt": [], "max_tokens": 0}),
    "completion-n-3": completion({"n": 3}),
    "completion-n-1000": completion({"n": 1000}),
    "completion-logprobs-turbomind": completion({"logprobs": 2}),
    "completion-extras": completion({"echo": True, "suffix": "!", "top_k": 5, "min_p": 0.1, "best_of": 2}),
    "completion-numeric-strings": completion({"max_tokens": "5", "top_p": "0.9"}),
    # --- completions: bodies LMDeploy refuses --------------------------------------------------------------------
    "completion-prompt-missing": completion({"prompt": DELETE}),
    "completion-prompt-number": completion({"prompt": 5}),
    "completion-prompt-object": completion({"prompt": {"text": "hi"}}),
    "completion-model-unknown": completion({"model": "gpt-4"}),
    "completion-temperature-negative": completion({"temperature": -1}),
    "completion-top-p-zero": completion({"top_p": 0}),
    "completion-top-k-negative": completion({"top_k": -3}),
    "completion-n-0": completion({"n": 0}),
    "completion-n-null": completion({"n": None}),
    "completion-min-p-high": completion({"min_p": 5}),
    "completion-logprobs-word": completion({"logprobs": "many"}),
    "completion-max-tokens-fraction": completion({"max_tokens": 2.5}),
    "completion-stream-word": completion({"stream": "maybe"}),
    "completion-logprobs-pytorch": completion({"logprobs": 2}, backend="pytorch"),
    # --- completions: refused later, by the tokenizer or the output budget ------------------------------------
    "completion-prompt-token-ids": completion({"prompt": [1, 2]}, later="prompt"),
    "completion-max-tokens-0": completion({"max_tokens": 0}, later="max_tokens"),
    "completion-max-completion-tokens-negative": completion(
        {"max_completion_tokens": -1}, later="max_completion_tokens"
    ),
    "completion-beyond-context": completion({"prompt": "x" * 4 * SESSION_LEN}, later="prompt"),
}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    status: int = 200
    message: str = ""
    fields: tuple[str, ...] = field(default=())  # the request fields the refusal names


# --- the oracle: LMDeploy's own code ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lmdeploy_oracle():
    """LMDeploy's request models, checks and generation config, as one function from a case to a verdict."""
    try:
        import lmdeploy
        from lmdeploy.messages import PytorchEngineConfig, TurbomindEngineConfig
        from lmdeploy.serve.managers import SessionManager
        from lmdeploy.serve.openai import protocol
        from lmdeploy.serve.openai.chat_completions.logits_processors import logit_bias_logits_processor
        from lmdeploy.serve.openai.chat_completions.validation import check_request as check_chat
        from lmdeploy.serve.openai.endpoints.common import build_serving_generation_config, validate_request
        from lmdeploy.serve.openai.endpoints.completions import check_request as check_completion
        from lmdeploy.serve.parsers import ResponseParserManager
    except ImportError as exc:
        reason = (
            f"lmdeploy's OpenAI server cannot be imported ({exc}); `make test` installs it without a GPU "
            f"(pip install -e '.[lmdeploy-contract]' && pip install --no-deps lmdeploy=={LMDEPLOY_VERSION})"
        )
        if os.environ.get("REQUIRE_LMDEPLOY_CONTRACT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    assert lmdeploy.__version__ == LMDEPLOY_VERSION, f"the contract is with {LMDEPLOY_VERSION}"
    engine_configs = {"turbomind": TurbomindEngineConfig, "pytorch": PytorchEngineConfig}
    tokenizer = SimpleNamespace(vocab_size=VOCAB_SIZE)  # all logit_bias reads of the tokenizer
    field_names = set(protocol.ChatCompletionRequest.model_fields) | set(protocol.CompletionRequest.model_fields)

    def verdict(case: Case) -> Verdict:
        body = case.body()
        model = protocol.ChatCompletionRequest if case.endpoint == "chat" else protocol.CompletionRequest
        try:
            request = model.model_validate(body)
        except ValidationError as exc:  # what LMDeploy's RequestValidationError handler answers
            error = exc.errors()[0]
            location = ".".join(str(part) for part in error["loc"])
            return Verdict(False, 400, f"{location}: {error['msg']}", (str(error["loc"][0]),))
        server = SimpleNamespace(
            engine_config=engine_configs[case.backend](),
            session_manager=SessionManager(),
            response_parser_cls=ResponseParserManager.get("default"),  # no tool-call parser configured
            async_engine=SimpleNamespace(model_name=MODEL),
            default_gen_config={},
        )
        try:
            if case.endpoint == "chat":
                response = validate_request(request, server, check_chat, json_request=body)
            else:
                response = validate_request(request, server, check_completion)
        except TypeError as exc:  # an unchecked None reaches a comparison: LMDeploy answers 500
            return Verdict(False, 500, str(exc))
        if response is not None:
            message = json.loads(response.body)["message"]
            return Verdict(False, response.status_code, message, _named_fields(message, field_names))
        if case.endpoint == "chat" and request.logit_bias is not None:
            try:
                logit_bias_logits_processor(request.logit_bias, tokenizer)
            except ValueError as exc:
                return Verdict(False, 400, str(exc), ("logit_bias",))
        try:
            with warnings.catch_warnings():  # LMDeploy reads its own deprecated max_tokens field here
                warnings.simplefilter("ignore", DeprecationWarning)
                build_serving_generation_config(request, server)
        except AssertionError as exc:  # GenerationConfig's own checks: LMDeploy answers 500
            return Verdict(False, 500, str(exc))
        return Verdict(True)

    return verdict


def _named_fields(message: str, field_names: set[str]) -> tuple[str, ...]:
    """The request fields a check's message names (``--enable-return-routed-experts`` names
    ``return_routed_experts``)."""
    words = re.sub(r"[^a-z0-9]+", " ", message.lower())
    return tuple(name for name in field_names if f" {name.replace('_', ' ')} " in f" {words} ")


# --- the simulator ------------------------------------------------------------------------------------------


def simulator_verdict(case: Case) -> tuple[Verdict, ApiError | None]:
    context = ServingContext(served_model=MODEL, session_len=SESSION_LEN, vocab_size=VOCAB_SIZE,
                             multimodal=case.multimodal, backend=case.backend)
    parse = parse_chat if case.endpoint == "chat" else parse_completion
    try:
        parse(json.dumps(case.body()).encode(), context)
    except ApiError as error:
        return Verdict(False, error.status, error.message, (str(error.param).split(".")[0],)), error
    return Verdict(True), None


# --- the contract -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_simulator_accepts_and_refuses_as_lmdeploy_does(lmdeploy_oracle, case: Case):
    expected = lmdeploy_oracle(case)
    got, error = simulator_verdict(case)
    if case.later is not None:
        assert expected.accepted, f"LMDeploy now refuses this before its template stage: {expected}"
        assert not got.accepted, "the simulator serves a request LMDeploy refuses at its template stage"
        assert (got.status, got.fields) == (400, (case.later,))
        return
    assert got.accepted == expected.accepted, f"LMDeploy: {expected}; simulator: {got}"
    if expected.accepted:
        return
    assert error is not None and error.param is not None, "a refusal must name the field"
    if expected.status == 500:  # LMDeploy fails with an internal error; the simulator says what is wrong
        assert got.status == 400
        return
    assert got.status == expected.status
    assert got.message == expected.message
    assert got.fields[0] in expected.fields, f"the simulator names {got.fields[0]!r}, LMDeploy {expected.fields}"


def test_the_table_has_both_verdicts_for_both_endpoints(lmdeploy_oracle):
    """The contract is not vacuous: LMDeploy serves some of these bodies and refuses others, on each endpoint."""
    verdicts = {(case.endpoint, lmdeploy_oracle(case).accepted) for case in CASES.values() if case.later is None}
    assert verdicts == {("chat", True), ("chat", False), ("completion", True), ("completion", False)}


def test_the_oracle_is_lmdeploys_check_not_the_simulators(lmdeploy_oracle):
    """The contract can fail: a body the simulator used to serve and LMDeploy refuses is refused by the oracle."""
    for fields in ({"messages": "hi"}, {"temperature": -5}):
        assert not lmdeploy_oracle(chat(fields)).accepted
    assert lmdeploy_oracle(chat({"n": 2})).accepted
