import itertools
import statistics

import pytest

from loadtests import load_profile, with_overrides
from loadtests.prompts import engine_prompt_tokens
from loadtests.workload import (
    CLASS_HEADER,
    RequestSpec,
    arrival_offsets_s,
    build_request,
    request_specs,
    think_times_s,
)


def test_request_sequence_is_deterministic_and_follows_the_profile():
    profile = load_profile("interactive")
    first = list(itertools.islice(request_specs(profile), 2000))
    assert first == list(itertools.islice(request_specs(profile), 2000))
    assert [s.index for s in first] == list(range(2000))
    prompts = [s.prompt_tokens for s in first]
    assert statistics.fmean(prompts) == pytest.approx(500, rel=0.05)
    assert min(prompts) >= 64 and max(prompts) <= 2048
    assert statistics.fmean(s.output_tokens for s in first) == pytest.approx(150, rel=0.05)
    other_seed = with_overrides(profile, seed=99)
    assert list(itertools.islice(request_specs(other_seed), 20)) != first[:20]


def test_open_loop_arrivals_are_poisson_at_the_rate():
    profile = load_profile("sharegpt-like")  # 8 requests/s
    offsets = list(itertools.islice(arrival_offsets_s(profile), 4000))
    gaps = [b - a for a, b in itertools.pairwise([0.0, *offsets])]
    assert all(gap > 0 for gap in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: stdev equals the mean
    with pytest.raises(ValueError, match="closed loop"):
        next(arrival_offsets_s(load_profile("batch")))


def test_think_times_per_user():
    profile = load_profile("interactive")  # uniform 0.5 .. 2.0 s
    user0 = list(itertools.islice(think_times_s(profile, 0), 500))
    assert user0 == list(itertools.islice(think_times_s(profile, 0), 500))
    assert user0[:10] != list(itertools.islice(think_times_s(profile, 1), 10))
    assert min(user0) >= 0.5 and max(user0) <= 2.0
    with pytest.raises(ValueError, match="open loop"):
        next(think_times_s(load_profile("sharegpt-like"), 0))


def test_chat_request_streams_with_usage_and_sends_the_class_header():
    profile = load_profile("batch")
    request = build_request(profile, RequestSpec(index=3, prompt_tokens=900, output_tokens=250), model="llama")
    assert request.path == "/v1/chat/completions"
    assert request.headers[CLASS_HEADER] == "batch"
    assert "authorization" not in request.headers
    body = request.body
    assert body["model"] == "llama" and body["max_tokens"] == 250 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert engine_prompt_tokens(body["messages"][0]["content"], api="chat") == 900


def test_completions_request_with_model_alias_and_api_key():
    profile = with_overrides(
        load_profile("sharegpt-like"), workload_class={"name": "interactive", "via": "model_alias"}, stream=False
    )
    request = build_request(profile, RequestSpec(index=0, prompt_tokens=40, output_tokens=8), model="m", api_key="k")
    assert request.path == "/v1/completions"
    assert request.body["model"] == "m:interactive"
    assert CLASS_HEADER not in request.headers
    assert request.headers["authorization"] == "Bearer k"
    assert "stream_options" not in request.body and request.body["stream"] is False
    assert engine_prompt_tokens(request.body["prompt"], api="completions") == 40


def test_no_class_sends_neither_header_nor_alias():
    request = build_request(load_profile("long-context"), RequestSpec(0, 8000, 200), model="m")
    assert request.body["model"] == "m" and CLASS_HEADER not in request.headers
