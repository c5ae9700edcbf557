"""Shared configurations for the tuner's tests."""

from __future__ import annotations

import json

import pytest

from gateway.config import TpgateConfig, load_config
from tests.integration.test_sim_engine import engine


def config_with(**environ_json: object) -> TpgateConfig:
    """The embedded default with fields replaced (``classes={...}`` becomes ``TPGATE_CLASSES='{...}'``)."""
    environ = {f"TPGATE_{key.upper()}": value if isinstance(value, str) else json.dumps(value)
               for key, value in environ_json.items()}
    return load_config(environ=environ)


@pytest.fixture
def internvl_8() -> TpgateConfig:
    """InternVL2.5-38B (40 heads, 8 KV heads) on 8 H100s, one class with the whole budget."""
    return config_with(
        classes={"interactive": {"objective": "min_e2e_p99", "profile": "interactive", "gpu_budget": 8,
                                 "slo": {"ttft_p99_s": 0.5, "tpot_p99_s": 0.04}},
                 "batch": {"objective": "max_output_tokens_per_s", "profile": "batch", "gpu_budget": 8,
                           "slo": {"ttft_p99_s": 5.0, "error_rate_max": 0.001}}},
        gpus=16,
    )


@pytest.fixture(scope="module")
def sim_engine():
    """A simulated Llama-3-8B on one H100 at time scale 10 (a real ``tpgate engine sim`` process)."""
    with engine("--model", "llama-3-8b", "--gpu", "h100-80gb", "--time-scale", "10") as (url, _):
        yield url
