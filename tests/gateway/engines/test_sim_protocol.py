"""Request validation, token counting and response bodies of the simulated engine (no server)."""

from __future__ import annotations

import json

import pytest

from gateway.engines.sim.protocol import (
    ResponseWriter,
    parse_chat,
    parse_completion,
    parse_json_body,
    sse,
)
from gateway.engines.sim.text import (
    IMAGE_TOKENS,
    NATURAL_MAX_TOKENS,
    NATURAL_MIN_TOKENS,
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


def chat(**fields: object):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **fields}
    return parse_chat(json.dumps(body).encode(), served_model=MODEL, session_len=SESSION_LEN)


def completion(**fields: object):
    body = {"model": MODEL, "prompt": "hello", **fields}
    return parse_completion(json.dumps(body).encode(), served_model=MODEL, session_len=SESSION_LEN)


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
    assert chat(messages="abcd").prompt_tokens == 3 + 4 + 1
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert chat(messages=[{"role": "user", "content": parts}]).prompt_tokens == 3 + 4 + 1 + IMAGE_TOKENS
    assert chat_prompt_tokens([([text_for_tokens(50)], 0)]) == 3 + 4 + 50


def test_output_follows_max_tokens_with_ignore_eos_and_both_spellings():
    assert completion(max_tokens=7, ignore_eos=True).plan.output_tokens == 7
    assert chat(max_completion_tokens=9, ignore_eos=True).plan.output_tokens == 9
    assert chat(max_completion_tokens=9, max_tokens=3, ignore_eos=True).plan.output_tokens == 9
    assert completion(ignore_eos=True).plan.output_tokens == 16  # the completions default
    # chat without a limit: the rest of the session
    request = chat(ignore_eos=True)
    assert request.plan.output_tokens == SESSION_LEN - request.prompt_tokens
    assert request.plan.finish_reason == "length"


def test_without_ignore_eos_the_model_stops_at_a_deterministic_natural_length():
    natural = natural_length("a prompt")
    assert NATURAL_MIN_TOKENS <= natural <= NATURAL_MAX_TOKENS
    assert natural_length("a prompt") == natural
    assert len({natural_length(f"prompt {i}") for i in range(50)}) > 20
    plan = completion(prompt="a prompt", max_tokens=2000).plan
    assert (plan.output_tokens, plan.finish_reason) == (natural, "stop")
    assert completion(prompt="a prompt", max_tokens=natural - 1).plan.finish_reason == "length"


def test_prompt_plus_output_is_capped_at_the_session_length():
    prompt = text_for_tokens(4000)
    request = completion(prompt=prompt, max_tokens=500, ignore_eos=True)
    assert request.plan.output_tokens == SESSION_LEN - request.prompt_tokens
    assert request.plan.finish_reason == "length"


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
        ({"model": None}, 400, "model", "missing required field 'model'"),
        ({"model": 5}, 400, "model", "valid string"),
        ({"messages": None}, 400, "messages", "'messages'"),
        ({"messages": []}, 400, "messages", "at least 1 item"),
        ({"messages": [{"content": "hi"}]}, 400, "messages.0.role", "missing required field 'messages.0.role'"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "valid string"),
        ({"n": 2}, 400, "n", "n=2 is not supported"),
        ({"max_tokens": -5}, 400, "max_tokens", "at least 1, not -5"),
        ({"max_tokens": 0}, 400, "max_tokens", "at least 1, not 0"),
        ({"max_completion_tokens": 10**9}, 400, "max_completion_tokens", "exceeds the session length"),
        ({"max_tokens": "100"}, 400, "max_tokens", "valid integer"),
        ({"max_tokens": 1.5}, 400, "max_tokens", "valid integer"),
        ({"stream": "yes"}, 400, "stream", "valid boolean"),
        ({"stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage", "valid boolean"),
        ({"stop": 3}, 400, "stop", "valid string"),
        ({"ignore_eos": 1}, 400, "ignore_eos", "valid boolean"),
        ({"temperature": "hot"}, 400, "temperature", "temperature"),
        ({"messages": [{"role": "user", "content": "x" * 20_000}]}, 400, "messages", "exceeds the session length"),
        ({"model": "other"}, 404, "model", "The model 'other' does not exist."),
    ],
)
def test_chat_validation_errors(fields: dict, status: int, param: str, message: str):
    # a None value removes the field
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    body = {k: v for k, v in body.items() if v is not None}
    error = api_error(parse_chat, json.dumps(body).encode(), served_model=MODEL, session_len=SESSION_LEN)
    assert error.status == status
    assert error.param == param
    assert message in error.message
    assert error.body()["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_completion_validation_errors():
    missing = api_error(parse_completion, json.dumps({"model": MODEL}).encode(), served_model=MODEL, session_len=64)
    assert (missing.status, missing.param) == (400, "prompt")
    body = json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode()
    batched = api_error(parse_completion, body, served_model=MODEL, session_len=64)
    assert "batched prompts are not supported" in batched.message
    too_long = api_error(
        parse_completion, json.dumps({"model": MODEL, "prompt": "x" * 256}).encode(), served_model=MODEL, session_len=64
    )
    assert too_long.code == "context_length_exceeded"
    assert "65 tokens" in too_long.message


def test_single_prompt_list_and_unknown_fields_are_accepted():
    request = completion(prompt=["abcd"], logit_bias={"1": 2}, best_of=1, seed=3)
    assert request.prompt_tokens == 2


def test_chat_response_and_chunks_have_lmdeploy_shape():
    request = chat(max_tokens=3, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    assert request.stream and request.include_usage
    writer = ResponseWriter(request)
    body = writer.response("abc", 3)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc", "reasoning_content": None,
                                             "tool_calls": None}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": request.prompt_tokens, "total_tokens": request.prompt_tokens + 3,
                             "completion_tokens": 3}
    chunk = writer.chunk("a", finish_reason=None)
    assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == body["id"]
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    usage = writer.usage_chunk(3)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    event = sse(chunk)
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert json.loads(event[len(b"data: "):]) == chunk


def test_completion_response_shape():
    request = completion(max_tokens=2, ignore_eos=True)
    writer = ResponseWriter(request)
    body = writer.response("ab", 2)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "length"}]
    assert writer.chunk("a")["choices"][0]["text"] == "a"
