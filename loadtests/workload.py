"""What a profile sends, request by request: lengths, arrival times and the OpenAI request bodies.

Pure and deterministic: the same profile (and seed) gives the same sequence of requests, whichever user sends
which, so two trials of a tuning study see the same work.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loadtests.profile import OpenLoop, Profile, sample_count
from loadtests.prompts import make_prompt

CLASS_HEADER = "x-workload-class"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass(frozen=True)
class RequestSpec:
    """The n-th request of a run: how many prompt tokens it sends and how many output tokens it asks for."""

    index: int
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class HttpRequest:
    """One OpenAI API call, ready to send: path, headers and JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def request_specs(profile: Profile) -> Iterator[RequestSpec]:
    """The run's requests in order; endless (the profile's cap and duration bound the run)."""
    rng = random.Random(f"{profile.seed}:lengths")
    index = 0
    while True:
        yield RequestSpec(
            index=index,
            prompt_tokens=sample_count(profile.prompt_tokens, rng),
            output_tokens=sample_count(profile.output_tokens, rng),
        )
        index += 1


def arrival_offsets_s(profile: Profile) -> Iterator[float]:
    """Open loop: when each request is due, in seconds from the start of the run (a Poisson process)."""
    if not isinstance(profile.arrival, OpenLoop):
        raise ValueError(f"profile {profile.name} is a closed loop: it has no arrival schedule")
    rng = random.Random(f"{profile.seed}:arrivals")
    offset_s = 0.0
    while True:
        offset_s += rng.expovariate(profile.arrival.rate_per_s)
        yield offset_s


def think_times_s(profile: Profile, user_index: int) -> Iterator[float]:
    """Closed loop: one user's pauses between a response and its next request, in seconds."""
    if isinstance(profile.arrival, OpenLoop):
        raise ValueError(f"profile {profile.name} is an open loop: its users do not think")
    rng = random.Random(f"{profile.seed}:think:{user_index}")
    while True:
        yield profile.arrival.think_time_s.sample(rng)


def served_model(profile: Profile, model: str) -> str:
    """The ``model`` field to send: the model, or ``<model>:<class>`` when the class travels as an alias."""
    if profile.workload_class is not None and profile.workload_class.via == "model_alias":
        return f"{model}:{profile.workload_class.name}"
    return model


def build_request(profile: Profile, spec: RequestSpec, *, model: str, api_key: str | None = None) -> HttpRequest:
    """The HTTP request for ``spec``: a prompt of exactly ``spec.prompt_tokens`` tokens (as the engine counts
    them) and ``max_tokens = spec.output_tokens`` with ``ignore_eos`` so the engine generates all of them."""
    prompt = make_prompt(spec.prompt_tokens, api=profile.api, seed=f"{profile.seed}:{spec.index}")
    body: dict[str, Any] = {
        "model": served_model(profile, model),
        "max_tokens": spec.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": profile.stream,
    }
    if profile.stream:
        body["stream_options"] = {"include_usage": True}
    if profile.api == "chat":
        path = CHAT_PATH
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = COMPLETIONS_PATH
        body["prompt"] = prompt
    headers = {"content-type": "application/json"}
    if profile.workload_class is not None and profile.workload_class.via == "header":
        headers[CLASS_HEADER] = profile.workload_class.name
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return HttpRequest(path=path, headers=headers, body=body)
