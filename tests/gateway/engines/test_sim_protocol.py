"""Request validation, token counting and response bodies of the simulated engine (no server)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gateway.engines.sim.protocol import (
    ChoiceDelta,
    GenerationRequest,
    ResponseWriter,
    ServingContext,
    check_content_type,
    parse_chat,
    parse_completion,
    parse_json_body,
    sse,
)
from gateway.engines.sim.text import (
    IMAGE_TOKENS,
    NATURAL_MAX_TOKENS,
    NATURAL_MIN_TOKENS,
    GenerationPlan,
    chat_prompt_tokens,
    filler_offset,
    filler_text,
    natural_length,
    plan_generation,
    text_for_tokens,
    text_tokens,
)
from gateway.errors import ApiError

MODEL = "sim-model"
SESSION_LEN = 4096
ENGINE = ServingContext(served_model=MODEL, session_len=SESSION_LEN, vocab_size=32_000, multimodal=True)
TEXT_ONLY = dataclasses.replace(ENGINE, multimodal=False)
PYTORCH = dataclasses.replace(ENGINE, backend="pytorch")


def chat(context: ServingContext = ENGINE, **fields: object) -> GenerationRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **fields}
    return parse_chat(json.dumps(body).encode(), context)


def completion(context: ServingContext = ENGINE, **fields: object) -> GenerationRequest:
    body = {"model": MODEL, "prompt": "hello", **fields}
    return parse_completion(json.dumps(body).encode(), context)


def only_plan(request: GenerationRequest) -> GenerationPlan:
    (choice,) = request.choices
    return choice.plan


def api_error(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)])
def test_text_tokens_are_a_quarter_of_the_characters_rounded_up(text: str, tokens: int):
    assert text_tokens(text) == tokens


def test_prompt_token_rules():
    assert completion(prompt="abcdefgh").prompt_tokens == 1 + 2  # BOS + text
    # priming 3 + per message (4 + content)
    messages = [{"role": "system", "content": "abcd"}, {"role": "user", "content": "abcdefgh"}]
    assert chat(messages=messages).prompt_tokens == 3 + (4 + 1) + (4 + 2)
    assert chat(messages=[{"role": "user"}]).prompt_tokens == 3 + 4  # no content: an empty text, as in LMDeploy
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert chat(messages=[{"role": "user", "content": parts}]).prompt_tokens == 3 + 4 + 1 + IMAGE_TOKENS
    assert chat_prompt_tokens([([text_for_tokens(50)], 0)]) == 3 + 4 + 50
    # token ids instead of messages: no chat template, one token per id
    assert chat(messages=[], input_ids=[5, 6, 7]).prompt_tokens == 3
    assert chat(messages=[], input_ids=[5, 6, 7], image_data=["a", "b"]).prompt_tokens == 3 + 2 * IMAGE_TOKENS


def test_content_blocks_that_are_not_objects_are_skipped_and_other_media_count_as_images():
    parts = ["stray", {"type": "text", "text": "abcd"}, {"type": "video_url", "video_url": {"url": "v"}}, {"x": 1}]
    assert chat(messages=[{"role": "user", "content": parts}]).prompt_tokens == 3 + 4 + 1 + IMAGE_TOKENS


def test_output_follows_max_tokens_with_ignore_eos_and_both_spellings():
    assert only_plan(completion(max_tokens=7, ignore_eos=True)).output_tokens == 7
    assert only_plan(chat(max_completion_tokens=9, ignore_eos=True)).output_tokens == 9
    assert only_plan(chat(max_completion_tokens=9, max_tokens=3, ignore_eos=True)).output_tokens == 9
    assert only_plan(completion(max_tokens="12", ignore_eos=True)).output_tokens == 12  # lax types, as LMDeploy's
    # without a limit, both endpoints run to the end of the session (LMDeploy 0.18 has no default of 16 tokens)
    for request in (chat(ignore_eos=True), completion(ignore_eos=True)):
        assert only_plan(request).output_tokens == SESSION_LEN - request.prompt_tokens
        assert only_plan(request).finish_reason == "length"


def test_a_limit_beyond_the_session_is_served_up_to_the_session_end():
    request = chat(max_completion_tokens=10**9, ignore_eos=True)
    assert only_plan(request).output_tokens == SESSION_LEN - request.prompt_tokens


def test_without_ignore_eos_the_model_stops_at_a_deterministic_natural_length():
    natural = natural_length("a prompt")
    assert NATURAL_MIN_TOKENS <= natural <= NATURAL_MAX_TOKENS
    assert natural_length("a prompt") == natural
    assert len({natural_length(f"prompt {i}") for i in range(50)}) > 20
    plan = only_plan(completion(prompt="a prompt", max_tokens=2000))
    assert (plan.output_tokens, plan.finish_reason) == (natural, "stop")
    assert only_plan(completion(prompt="a prompt", max_tokens=natural - 1)).finish_reason == "length"


def test_prompt_plus_output_is_capped_at_the_session_length():
    prompt = text_for_tokens(4000)
    request = completion(prompt=prompt, max_tokens=500, ignore_eos=True)
    assert only_plan(request).output_tokens == SESSION_LEN - request.prompt_tokens
    assert only_plan(request).finish_reason == "length"


def test_stop_strings_cut_the_filler():
    plan = plan_generation(max_new_tokens=100, ignore_eos=True, stop=["engine"], prompt_key="k")
    text = filler_text(0, plan.output_tokens, limit_chars=plan.text_chars)
    assert plan.finish_reason == "stop"
    assert "engine" not in text
    assert text == filler_text(0, 100)[: filler_text(0, 100).index("engine")]
    assert filler_offset(plan.output_tokens - 1) <= len(text) < filler_offset(plan.output_tokens)
    unmatched = plan_generation(max_new_tokens=10, ignore_eos=True, stop=["zebra"], prompt_key="k")
    assert (unmatched.output_tokens, unmatched.finish_reason) == (10, "length")


def test_filler_is_deterministic_and_streams_concatenate_to_the_whole():
    whole = filler_text(0, 50)
    assert whole == filler_text(0, 50)
    assert "".join(filler_text(i, i + 1) for i in range(50)) == whole
    assert len(filler_text(0, 1)) > 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'"text"', "must be a JSON object, not str"),
    ],
)
def test_malformed_bodies(body: bytes, message: str):
    error = api_error(parse_json_body, body)
    assert error.status == 400
    assert message in error.message


@pytest.mark.parametrize(
    ("fields", "status", "param", "message"),
    [
        ({"model": None}, 400, "model", "model: Field required"),
        ({"model": 5}, 400, "model", "model: Input should be a valid string"),
        ({"messages": None}, 400, "messages", "messages: Field required"),
        ({"messages": "hi"}, 400, "messages", "messages: Input should be a valid list"),
        ({"messages": ["hi"]}, 400, "messages.0", "messages.0: Input should be a valid dictionary"),
        ({"messages": []}, 400, "messages", "messages must not be empty unless input_ids is set."),
        ({"messages": [{"content": "hi"}]}, 400, "messages.0.role", "messages.0.role: Field required"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "valid string or list"),
        ({"temperature": -5}, 400, "temperature", "The temperature -5.0 must be in [0, 2]"),
        ({"temperature": "hot"}, 400, "temperature", "temperature: Input should be a valid number"),
        ({"top_p": 0}, 400, "top_p", "The top_p 0.0 must be in (0, 1]."),
        ({"top_k": -1}, 400, "top_k", "The top_k -1 cannot be a negative integer."),
        ({"min_p": 1.5}, 400, "min_p", "The min_p 1.5 must be in [0, 1]."),
        ({"n": 0}, 400, "n", "The n 0 must be a positive int."),
        ({"n": 129}, 400, "n", "The n 129 exceeds the maximum supported choices (128)."),
        ({"n": 2, "session_id": 7}, 400, "n", "n > 1 cannot be used with an explicit session_id."),
        ({"n": 2, "with_cache": True}, 400, "n", "n > 1 is not supported with cache migration."),
        ({"max_tokens": -5}, 400, "max_tokens", "The max_tokens -5 must be a positive integer."),
        ({"max_tokens": 0}, 400, "max_tokens", "The max_tokens 0 must be a positive integer."),
        ({"max_completion_tokens": 0}, 400, "max_completion_tokens", "must be a positive integer"),
        ({"max_tokens": 1.5}, 400, "max_tokens", "max_tokens: Input should be a valid integer"),
        ({"min_new_tokens": -1}, 400, "min_new_tokens", "cannot be a negative integer"),
        ({"top_logprobs": 21}, 400, "top_logprobs", "The top_logprobs 21 must be in [0, 20]."),
        ({"stream": "maybe"}, 400, "stream", "stream: Input should be a valid boolean"),
        ({"stream_options": {"include_usage": "maybe"}}, 400, "stream_options.include_usage", "valid boolean"),
        ({"stop": 3}, 400, "stop", "stop.str: Input should be a valid string"),
        ({"repetition_ngram_size": -1}, 400, "repetition_ngram_size", "greater than or equal to 0"),
        ({"tool_choice": "required"}, 400, "tool_choice", '`tool_choice="required"` requires at least one tool.'),
        ({"tools": [{"function": {"name": "f"}}]}, 400, "tools", "--tool-call-parser"),
        ({"tools": [{"function": {}}]}, 400, "tools.0.function.name", "tools.0.function.name: Field required"),
        ({"response_format": {"type": "xml"}}, 400, "response_format.type", "response_format.type: Input should be"),
        ({"reasoning_effort": "extreme"}, 400, "reasoning_effort", "reasoning_effort: Input should be"),
        ({"return_routed_experts": True}, 400, "return_routed_experts", "not supported in TurbomindEngineConfig"),
        ({"logit_bias": {"abc": 1}}, 400, "logit_bias", "not an integer or string representing an integer"),
        ({"logit_bias": {"32000": 1}}, 400, "logit_bias", "token_id 32000 in logit_bias contains out-of-vocab"),
        ({"input_ids": [1, 2]}, 400, "input_ids", "input_ids cannot be used when messages is non-empty."),
        ({"messages": [], "input_ids": []}, 400, "input_ids", "The input_ids must not be an empty list."),
        ({"messages": [], "image_data": "x"}, 400, "image_data", "image_data requires input_ids"),
        ({"messages": [{"role": "user", "content": "x" * 20_000}]}, 400, "messages",
         "Input length (5007) must be smaller than the model context length (4096)."),
        ({"model": "other"}, 404, "model", "The model 'other' does not exist."),
    ],
)
def test_chat_validation_errors(fields: dict, status: int, param: str, message: str):
    # a None value removes the field
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    body = {k: v for k, v in body.items() if v is not None}
    error = api_error(parse_chat, json.dumps(body).encode(), ENGINE)
    assert error.status == status
    assert error.param == param
    assert message in error.message
    assert error.body()["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 2}, {"n": 128}, {"n": None}, {"max_tokens": "100"}, {"stream": "yes"}, {"ignore_eos": 1},
        {"stream_options": {"include_usage": "true"}}, {"temperature": 0}, {"temperature": 2}, {"top_p": 1},
        {"logit_bias": {"5": 200.0}}, {"tools": [{"function": {"name": "f"}}], "tool_choice": "none"},
        {"tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
        {"session_id": 7}, {"logprobs": True, "top_logprobs": 3}, {"some_future_field": [1, 2]},
    ],
)
def test_chat_accepts_what_lmdeploy_accepts(fields: dict):
    assert chat(**fields).choices


def test_validation_follows_lmdeploys_stages_in_order():
    # the model's types first, then the model name, then the ranges
    assert api_error(chat, model="other", temperature="hot").param == "temperature"
    assert api_error(chat, model="other", temperature=-1).status == 404
    # the first failing field in declaration order is the one named, as LMDeploy names it
    assert api_error(chat, max_tokens="x", temperature="hot").param == "temperature"
    # the context length is checked before the output budget
    long = [{"role": "user", "content": "x" * 20_000}]
    assert api_error(completion, prompt="x" * 20_000, max_tokens=0).code == "context_length_exceeded"
    assert api_error(chat, messages=long, logit_bias={"x": 1}).param == "logit_bias"


def test_the_pytorch_backend_refuses_logprobs_without_a_logprobs_mode():
    assert chat(logprobs=True).choices  # TurboMind: LMDeploy does not check
    error = api_error(chat, PYTORCH, logprobs=True)
    assert (error.param, error.message) == (
        "logprobs", "Logprobs(True)/top_logprobs(0) requested but not enabled logprobs_mode in engine configuration"
    )
    assert api_error(chat, PYTORCH, top_logprobs=2).param == "top_logprobs"
    assert api_error(chat, PYTORCH, return_logprob=True).param == "return_logprob"
    assert api_error(completion, PYTORCH, logprobs=2).param == "logprobs"
    assert "not configured" in api_error(chat, PYTORCH, return_routed_experts=True).message


def test_images_need_a_vision_model():
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    error = api_error(chat, TEXT_ONLY, messages=[{"role": "user", "content": parts}])
    assert (error.status, error.param) == (400, "messages")
    assert error.message == "Multimodal input is not supported by this model."
    assert api_error(chat, TEXT_ONLY, messages=[], input_ids=[1], image_data="x").param == "image_data"


def test_chat_n_gives_n_choices_of_the_same_prompt_that_stop_on_their_own():
    request = chat(n=5, max_tokens=2000)
    assert len(request.choices) == 5
    assert {choice.prompt_tokens for choice in request.choices} == {request.prompt_tokens}
    assert len({choice.plan.output_tokens for choice in request.choices}) > 1  # sampled independently
    assert request.choices[0].plan == only_plan(chat(max_tokens=2000))  # choice 0 is what n=1 gives
    same = chat(n=3, max_tokens=7, ignore_eos=True)
    assert [choice.plan.output_tokens for choice in same.choices] == [7, 7, 7]
    assert not same.streams_one_choice_at_a_time


def test_completion_gives_one_choice_per_prompt_and_ignores_n():
    assert len(completion(n=4).choices) == 1
    request = completion(prompt=["abcd", "abcdefgh"], max_tokens=3, ignore_eos=True, stream=True)
    assert [choice.prompt_tokens for choice in request.choices] == [2, 3]
    assert request.prompt_tokens == 5  # usage adds up every prompt
    assert request.streams_one_choice_at_a_time
    assert completion(prompt=[]).choices == ()
    error = api_error(completion, prompt=["a", 7])
    assert (error.param, error.message) == ("prompt", "prompt.1: Input should be a valid string (got 7)")


def test_completion_validation_errors():
    context = dataclasses.replace(ENGINE, session_len=64)
    missing = api_error(parse_completion, json.dumps({"model": MODEL}).encode(), context)
    assert (missing.status, missing.param, missing.message) == (400, "prompt", "prompt: Field required")
    too_long = api_error(parse_completion, json.dumps({"model": MODEL, "prompt": "x" * 256}).encode(), context)
    assert too_long.code == "context_length_exceeded"
    assert too_long.message == "Input length (65) must be smaller than the model context length (64)."
    for fields, param, message in [
        ({"max_tokens": 0}, "max_tokens", "max_new_tokens must be at least 1, got 0."),
        ({"max_completion_tokens": -2}, "max_completion_tokens", "max_new_tokens must be at least 1, got -2."),
        ({"n": 0}, "n", "The n 0 must be a positive int."),
        ({"n": None}, "n", "The n None must be a positive int."),
        ({"min_p": 2}, "min_p", "The min_p 2.0 must be in [0, 1]."),
        ({"temperature": 3}, "temperature", "The temperature 3.0 must be in [0, 2]"),
        ({"prompt": 12}, "prompt", "prompt.str: Input should be a valid string"),
    ]:
        error = api_error(completion, **fields)
        assert (error.status, error.param, error.message) == (400, param, message)


def test_single_prompt_list_and_unknown_fields_are_accepted():
    request = completion(prompt=["abcd"], logit_bias={"1": 2}, best_of=1, seed=3)
    assert request.prompt_tokens == 2


@pytest.mark.parametrize("value", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_accepted(value: str):
    check_content_type(value)


@pytest.mark.parametrize("value", [None, "", "text/plain", "application/x-www-form-urlencoded"])
def test_other_content_types_are_refused_as_lmdeploy_refuses_them(value: str | None):
    error = api_error(check_content_type, value)
    assert (error.status, error.message) == (400, "Unsupported Media Type: Only 'application/json' is allowed")


def test_chat_response_and_chunks_have_lmdeploy_shape():
    request = chat(max_tokens=3, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    assert request.stream and request.include_usage
    writer = ResponseWriter(request)
    body = writer.response()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": filler_text(0, 3),
                                             "reasoning_content": None, "tool_calls": None}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": request.prompt_tokens, "total_tokens": request.prompt_tokens + 3,
                             "completion_tokens": 3}
    chunk = writer.chunk([ChoiceDelta(0, "a")])
    assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == body["id"]
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    usage = writer.usage_chunk(3)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    event = sse(chunk)
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert json.loads(event[len(b"data: "):]) == chunk


def test_several_choices_in_the_response_chunks_and_usage():
    request = chat(n=3, max_tokens=4, ignore_eos=True)
    writer = ResponseWriter(request)
    body = writer.response()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert all(choice["message"]["content"] == filler_text(0, 4) for choice in body["choices"])
    # the prompt counts once, the output of every choice counts
    assert body["usage"] == {"prompt_tokens": request.prompt_tokens, "completion_tokens": 12,
                             "total_tokens": request.prompt_tokens + 12}
    chunk = writer.chunk([ChoiceDelta(2, "b", "length"), ChoiceDelta(0, "a")])
    assert [(c["index"], c["delta"]["content"], c["finish_reason"]) for c in chunk["choices"]] == [
        (0, "a", None), (2, "b", "length"),
    ]


def test_completion_response_shape():
    request = completion(prompt=["ab", "cd"], max_tokens=2, ignore_eos=True)
    writer = ResponseWriter(request)
    body = writer.response()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [
        {"index": index, "text": filler_text(0, 2), "logprobs": None, "finish_reason": "length"} for index in (0, 1)
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert writer.chunk([ChoiceDelta(1, "a")])["choices"] == [
        {"index": 1, "text": "a", "logprobs": None, "finish_reason": None}
    ]
