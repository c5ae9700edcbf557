"""The real ``tpgate engine sim`` process: the official openai client, raw HTTP error paths, metrics, SIGTERM,
and queueing under KV-cache pressure."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engines import metric_names as names
from gateway.engines.sim.text import filler_text, text_for_tokens

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "llama-2-7b"
SERVED = "sim-llama"


def tpgate_argv() -> list[str]:
    script = Path(sys.executable).with_name("tpgate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


@contextmanager
def engine(*flags: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A ``tpgate engine sim`` on a free loopback port (it reports the port it bound); stopped with SIGTERM."""
    argv = [*tpgate_argv(), "engine", "sim", "--host", "127.0.0.1", "--port", "0", *flags]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert match, f"engine did not start: {line}{process.stderr.read() if process.poll() is not None else ''}"
        url = match.group(1)
        wait_healthy(url)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def wait_healthy(url: str) -> None:
    """Poll ``/health`` (blocking: the engine is another process, and fixtures may run inside an event loop)."""
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("engine never became healthy")


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with engine("--model", MODEL, "--gpu", "a100-80gb", "--model-name", SERVED, "--time-scale", "50") as (url, _):
        yield url


@pytest.fixture
def client(sim: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{sim}/v1", api_key="unused", max_retries=0) as client:
        yield client


async def post(url: str, path: str, body: bytes | dict, **headers: str) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession() as session, session.post(f"{url}{path}", data=data, headers=headers) as response:
        return response.status, await response.json()


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name} not in the scrape"
    return float(match.group(1))


# --- the openai client --------------------------------------------------------------------------------


def test_models_lists_the_served_model_and_says_it_is_simulated(client: openai.OpenAI):
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED]
    assert models[0].owned_by == "tpgate-simulator"
    extra = models[0].model_dump()
    assert extra["simulated"] is True
    assert "simulated" in extra["description"] and "a100-80gb" in extra["description"]


def test_chat_completion(client: openai.OpenAI):
    response = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "abcdefgh"}], max_tokens=12, extra_body={"ignore_eos": True}
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == filler_text(0, 12)
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        3 + 4 + 2, 12, 21,
    )


def test_chat_completion_stops_at_a_stop_string_and_at_the_natural_length(client: openai.OpenAI):
    response = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=50, stop=["engine"],
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].finish_reason == "stop"
    assert "engine" not in (response.choices[0].message.content or "")
    hi = [{"role": "user", "content": "hi"}]
    natural = client.chat.completions.create(model=SERVED, messages=hi, max_tokens=1000)
    again = client.chat.completions.create(model=SERVED, messages=hi, max_tokens=1000)
    assert natural.choices[0].finish_reason == "stop"
    assert natural.usage is not None and again.usage is not None
    assert natural.usage.completion_tokens == again.usage.completion_tokens < 1000


def test_completion(client: openai.OpenAI):
    response = client.completions.create(
        model=SERVED, prompt=text_for_tokens(40), max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert response.choices[0].text == filler_text(0, 5)
    assert response.usage is not None and response.usage.prompt_tokens == 41


def test_streaming_chat_with_usage(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "abcd"}], max_tokens=20, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == filler_text(0, 20)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3 + 4 + 1, 20)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_with_n_choices(client: openai.OpenAI):
    response = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "abcd"}], n=3, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content == filler_text(0, 5) and c.finish_reason == "length" for c in response.choices)
    assert response.usage is not None
    # the prompt counts once, every choice's output counts
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3 + 4 + 1, 15)


def test_streaming_chat_with_n_choices_interleaves_them_by_index(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "abcd"}], n=3, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    texts = {index: "" for index in range(3)}
    finish = {}
    for chunk in chunks:
        indexes = [choice.index for choice in chunk.choices]
        assert indexes == sorted(set(indexes))  # at most one entry per choice, in index order
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert texts == {index: filler_text(0, 8) for index in range(3)}
    assert finish == {0: "length", 1: "length", 2: "length"}
    # the three sequences run in one batch: most events carry all three choices
    assert sum(len(chunk.choices) == 3 for chunk in chunks) >= len([c for c in chunks if c.choices]) // 2
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, 24)


def test_completion_of_several_prompts_gives_a_choice_per_prompt(client: openai.OpenAI):
    response = client.completions.create(
        model=SERVED, prompt=["abcd", "abcdefgh"], n=2, max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert [(c.index, c.text) for c in response.choices] == [(0, filler_text(0, 4)), (1, filler_text(0, 4))]
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (2 + 3, 8)
    chunks = list(client.completions.create(model=SERVED, prompt=["a", "b"], max_tokens=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    order = [c.choices[0].index for c in chunks]
    assert order == sorted(order) and set(order) == {0, 1}  # streamed one prompt after the other


async def test_an_empty_prompt_list_gives_no_choices_as_in_lmdeploy(sim: str):
    status, payload = await post(sim, "/v1/completions", {"model": SERVED, "prompt": []})
    assert status == 200
    assert payload["choices"] == [] and payload["usage"]["total_tokens"] == 0


def test_streaming_completion_without_usage(client: openai.OpenAI):
    chunks = list(client.completions.create(model=SERVED, prompt="x", max_tokens=6, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == filler_text(0, 6)
    assert all(c.usage is None for c in chunks)


def test_unknown_model_is_a_404_for_the_client(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-4" in str(info.value)


# --- raw HTTP: every error path ------------------------------------------------------------------------

CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"{oops", 400, "not valid JSON"),
        ("/v1/chat/completions", b"", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[]", 400, "must be a JSON object"),
        ("/v1/chat/completions", {"model": SERVED}, 400, "messages: Field required"),
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "model: Field required"),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages: Input should be a valid list"),
        ("/v1/chat/completions", {**CHAT, "temperature": -5}, 400, "The temperature -5.0 must be in [0, 2]"),
        ("/v1/chat/completions", {**CHAT, "n": 129}, 400, "exceeds the maximum supported choices (128)"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, "The max_tokens -1 must be a positive integer."),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "ten"}, 400, "max_tokens: Input should be a valid integer"),
        ("/v1/chat/completions", {**CHAT, "stream": "maybe"}, 400, "stream: Input should be a valid boolean"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 17_000}]}, 400,
         "must be smaller than the model context length (4096)"),
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "The model 'nope' does not exist."),
        ("/v1/completions", {"model": SERVED}, 400, "prompt: Field required"),
        ("/v1/completions", {"model": SERVED, "prompt": [1, 2]}, 400, "prompt.0: Input should be a valid string"),
        ("/v1/completions", {"model": SERVED, "prompt": 12}, 400, "prompt.str: Input should be a valid string"),
        ("/v1/completions", {"model": SERVED, "prompt": "x", "max_completion_tokens": 0}, 400,
         "max_new_tokens must be at least 1, got 0."),
        ("/v1/embeddings", {"model": SERVED, "input": "x"}, 404, "Not Found"),
    ],
)
async def test_errors_have_the_openai_shape(sim: str, path: str, body: bytes | dict, status: int, needle: str):
    got_status, payload = await post(sim, path, body)
    assert got_status == status
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert needle in payload["error"]["message"]
    assert payload["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


async def test_a_body_that_is_not_declared_json_is_refused_as_lmdeploy_refuses_it(sim: str):
    body = json.dumps({**CHAT, "max_tokens": 1}).encode()
    status, payload = await post(sim, "/v1/chat/completions", body, **{"Content-Type": "text/plain"})
    assert status == 400
    assert payload["error"]["message"] == "Unsupported Media Type: Only 'application/json' is allowed"
    status, _ = await post(sim, "/v1/chat/completions", body, **{"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


async def test_wrong_method_is_405_in_the_openai_shape(sim: str):
    async with aiohttp.ClientSession() as session, session.get(f"{sim}/v1/chat/completions") as response:
        assert response.status == 405
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_bad_input_never_breaks_the_engine(sim: str):
    for body in (b"\x00\xff", b"{}", b'{"model": null}', b'{"model": "' + b"a" * 10_000 + b'"}', b"1e999"):
        status, _ = await post(sim, "/v1/completions", body)
        assert status == 400
    status, payload = await post(sim, "/v1/completions", {"model": SERVED, "prompt": "x", "max_tokens": 2})
    assert status == 200 and payload["usage"]["completion_tokens"] == 2


async def test_health(sim: str):
    async with aiohttp.ClientSession() as session, session.get(f"{sim}/health") as response:
        assert response.status == 200


# --- metrics ---------------------------------------------------------------------------------------------


async def test_metrics_have_lmdeploy_names_types_and_labels(sim: str):
    await post(sim, "/v1/completions", {"model": SERVED, "prompt": "abcd", "max_tokens": 3, "ignore_eos": True})
    text = await scrape(sim)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        names.NUM_REQUESTS_RUNNING: "gauge",
        names.NUM_REQUESTS_WAITING: "gauge",
        names.GPU_CACHE_USAGE_PERC: "gauge",
        names.PROMPT_TOKENS_TOTAL.removesuffix("_total"): "counter",
        names.GENERATION_TOKENS_TOTAL.removesuffix("_total"): "counter",
        names.REQUEST_SUCCESS_TOTAL.removesuffix("_total"): "counter",
        names.TIME_TO_FIRST_TOKEN_SECONDS: "histogram",
        names.TIME_PER_OUTPUT_TOKEN_SECONDS: "histogram",
        names.E2E_REQUEST_LATENCY_SECONDS: "histogram",
        names.REQUEST_QUEUE_TIME_SECONDS: "histogram",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert sample.labels["model_name"] == SERVED
            assert sample.labels["engine"] == "0"
    assert "lmdeploy:prompt_tokens_total{" in text and "_created" not in text
    info = families["lmdeploy:backend_config_info"].samples[0].labels
    assert info["simulated"] == "true" and info["gpu"] == "a100-80gb"
    success = [s for s in families["lmdeploy:request_success"].samples if s.labels["finished_reason"] == "length"]
    assert success[0].value >= 1
    assert gauge(text, names.PROMPT_TOKENS_TOTAL) >= 2


async def test_each_choice_is_a_request_in_the_engine_metrics(sim: str):
    """LMDeploy serves n choices as n generations: n finished requests, n prompts prefilled."""
    before = await scrape(sim)
    body = {**CHAT, "messages": [{"role": "user", "content": "abcd"}], "n": 4, "max_tokens": 3, "ignore_eos": True}
    status, payload = await post(sim, "/v1/chat/completions", body)
    assert status == 200 and len(payload["choices"]) == 4
    after = await scrape(sim)

    def finished(text: str) -> float:  # over every finished_reason
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == names.REQUEST_SUCCESS_TOTAL)

    assert finished(after) - finished(before) == 4
    assert gauge(after, names.GENERATION_TOKENS_TOTAL) - gauge(before, names.GENERATION_TOKENS_TOTAL) == 12
    assert gauge(after, names.PROMPT_TOKENS_TOTAL) - gauge(before, names.PROMPT_TOKENS_TOTAL) == 4 * 8


async def test_metrics_are_in_simulated_seconds(sim: str):
    # 50 decode steps of Llama-2-7B on an A100 take about 0.5 s of simulated time: 10 ms real at scale 50.
    before = await scrape(sim)
    start = time.monotonic()
    await post(sim, "/v1/completions", {"model": SERVED, "prompt": "abcd", "max_tokens": 51, "ignore_eos": True})
    real_s = time.monotonic() - start
    after = await scrape(sim)
    e2e_sum = names.E2E_REQUEST_LATENCY_SECONDS + "_sum"
    simulated_s = gauge(after, e2e_sum) - gauge(before, e2e_sum)
    assert 0.4 < simulated_s < 0.7
    assert real_s < simulated_s


async def test_the_engine_reports_how_fast_its_clock_really_ran(sim: str):
    await post(sim, "/v1/completions", {"model": SERVED, "prompt": "abcd", "max_tokens": 20, "ignore_eos": True})
    sent_s = time.time()
    async with aiohttp.ClientSession() as session, session.get(f"{sim}/sim/stats") as response:
        stats = await response.json()
    assert sent_s <= stats["unix_time_s"] <= time.time()  # the moment the clock was read, on this host
    # Time scale 50 on a shared machine: never faster than 50, and a loaded machine shows as less.
    assert 0 < stats["clock_rate_ratio"] <= 50.5
    assert 0 < stats["clock_rate_recent_ratio"] <= 50.5
    assert stats["clock_rate_ratio"] == pytest.approx(stats["simulated_time_s"] / stats["wall_time_s"], rel=0.05)
    assert stats["kv_cache_block_tokens"] == 64 and stats["queued"] == 0
    text = await scrape(sim)
    assert gauge(text, "tpgate_sim_time_seconds_total") > 0
    life = re.search(r'^tpgate_sim_clock_rate_ratio\{[^}]*window="life"[^}]*\} (\S+)$', text, re.M)
    assert life and 0 < float(life.group(1)) <= 50.5


# --- shutdown ----------------------------------------------------------------------------------------------


async def test_sigterm_shuts_down_cleanly_mid_stream():
    with engine("--model", MODEL, "--gpu", "a100-80gb", "--time-scale", "1") as (url, process):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200
            first = await response.content.readline()
            assert first.startswith(b"data: {")
            process.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(response.content.read(), timeout=10)
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert b'"error"' in rest
        assert process.wait(timeout=10) == 0


# --- KV-cache pressure -------------------------------------------------------------------------------------


async def waiting_under_load(url: str, *, requests: int, prompt_tokens: int, output_tokens: int) -> list[float]:
    """Send ``requests`` requests at once; ``num_requests_waiting`` sampled until they all finished."""
    body = {"model": "llama-2-70b", "prompt": text_for_tokens(prompt_tokens), "max_tokens": output_tokens,
            "ignore_eos": True}
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(f"{url}/v1/completions", json=body) as response:
                return response.status

        load = [asyncio.create_task(one()) for _ in range(requests)]
        samples: list[float] = []
        while not all(task.done() for task in load):
            samples.append(gauge(await scrape(url), names.NUM_REQUESTS_WAITING))
            await asyncio.sleep(0.02)
        assert [task.result() for task in load] == [200] * requests
    return samples


async def test_a_kv_cache_that_holds_few_sequences_queues_and_a_larger_tp_queues_less():
    # Llama-2-70B on A100s with a tenth of the free memory as KV cache: TP 2 holds 8,362 tokens (six of these
    # 1,300-token sequences), TP 4 holds 58,825 (all 32).
    flags = ("--model", "llama-2-70b", "--gpu", "a100-80gb", "--cache-max-entry-count", "0.1", "--time-scale", "20")
    load = {"requests": 32, "prompt_tokens": 1000, "output_tokens": 300}
    with engine(*flags, "--tp", "2") as (url, _):
        tp2 = await waiting_under_load(url, **load)
    with engine(*flags, "--tp", "4") as (url, _):
        tp4 = await waiting_under_load(url, **load)
    assert max(tp2) >= 24  # at most six of the 32 ever ran together
    # TP 2 keeps requests waiting for KV-cache blocks most of the time: the queue drains by about six per batch,
    # from 26 to 0, so half the samples see more than one batch's worth waiting (~13 on a quiet machine; a busy one
    # samples the long tail more)
    assert statistics.median(tp2) > 6
    assert statistics.median(tp4) == 0  # TP 4 only while the 32 prompts are prefilled, then never
