from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.control.initial_state import class_budgets, initial_state
from gateway.control.state import Capacity, validate_state
from gateway.errors import UserError
from gateway.planner import load_model


def write(tmp_path, text):
    path = tmp_path / "tpgate.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_default():
    config = load_config()
    assert (config.model, config.gpu, config.gpus, config.engine.kind) == ("internvl2_5-38b", "h100-80gb", 8, "sim")
    assert (config.server.host, config.server.port, config.server.fast_path) == ("127.0.0.1", 8000, "haproxy")
    assert set(config.classes) == {"interactive", "batch"}
    assert config.classes["interactive"].slo.ttft_p99_s == 0.5


def test_file_then_environment_then_flags(tmp_path):
    path = write(tmp_path, "gpus: 4\nserver: {port: 9000}\n")
    config = load_config(path, environ={"TPGATE_SERVER__PORT": "9100", "TPGATE_GPUS": "2", "OTHER": "x",
                                        "TPGATE_API_KEY": "sk-for-tpgate-load"},
                         overrides={"gpus": 1, "server.host": None})
    assert (config.gpus, config.server.port, config.server.host) == (1, 9100, "127.0.0.1")


@pytest.mark.parametrize(("text", "message"), [
    ("gpus: 0\n", "invalid configuration: gpus must be at least 1, not 0"),
    ("colour: blue\n", "colour is not a known field"),
    ("default_class: realtime\n", "default_class 'realtime' is not a class"),
    ("pools: {a: {tp: 4, replicas: 2}}\nroutes: {interactive: {a: 1}, batch: {a: 1}}\n",
     "pools need 8 GPUs (a 2x4), more than gpus=4"),
    ("pools: {a: {tp: 1}}\nroutes: {interactive: {a: 1}}\n", "routes must name every class"),
    ("pools: {a: {tp: 1}}\nroutes: {interactive: {a: 0.5}, batch: {a: 1}}\n", "weights sum to 0.5, not 1"),
    ("pools: {a: {tp: 1}}\nroutes: {interactive: {b: 1}, batch: {a: 1}}\n", "names unknown pools ['b']"),
    ("auth: {api_keys: [{default_class: batch}]}\n", "needs exactly one of 'key' or 'key_env'"),
    ("engine: {kind: vllm}\n", "engine.kind must be 'sim' or 'lmdeploy', not 'vllm'"),
    ("pools: {a: {tp: 1, knobs: {quant_policy: 3}}}\nroutes: {interactive: {a: 1}, batch: {a: 1}}\n",
     "pools.a.knobs.quant_policy must be 0, 4 or 8, not 3"),
    ("[1, 2]\n", "the configuration must be a mapping"),
    ("gpus: [\n", "malformed YAML"),
])
def test_bad_configuration_is_a_user_error(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, "gpus: 4\n" + text if not text.startswith("[") else text))
    assert message in str(info.value)


def test_bad_environment_value_is_named():
    with pytest.raises(UserError, match="server.port must be an integer, not 'eighty'"):
        load_config(environ={"TPGATE_SERVER__PORT": "eighty"})
    with pytest.raises(UserError, match="TPGATE_ROUTES must be JSON"):
        load_config(environ={"TPGATE_ROUTES": "{interactive: x"})


def test_environment_merges_into_the_file_and_reads_json_for_lists(tmp_path):
    path = write(tmp_path, "server: {host: 127.0.0.2, port: 9000}\n")
    config = load_config(path, environ={"TPGATE_SERVER__PORT": "9100", "TPGATE_ENGINE__EXTRA_ARGS": '["--x", "1"]',
                                        "TPGATE_ENGINE__TIME_SCALE": "10", "TPGATE_ROUTER__REPLICAS": "2"})
    assert (config.server.host, config.server.port) == ("127.0.0.2", 9100)
    assert config.engine.extra_args == ["--x", "1"] and config.engine.time_scale == 10.0
    assert config.router.replicas == 2


def test_constructing_a_config_reads_no_environment(monkeypatch):
    monkeypatch.setenv("TPGATE_GPUS", "3")
    from gateway.config import TpgateConfig
    assert TpgateConfig().gpus == 8 and load_config(environ={"TPGATE_GPUS": "3"}).gpus == 3


def test_api_key_secret_is_not_printed(tmp_path):
    config = load_config(write(tmp_path, "auth: {api_keys: [{key: sk-very-secret, default_class: batch}]}\n"))
    assert "sk-very-secret" not in repr(config)


def test_planner_default_pools_per_class():
    config = load_config()
    capacity = Capacity(model=load_model(config.model), gpu=config.catalog()[config.gpu], gpus=8, gpus_per_node=8)
    state = initial_state(config, capacity)
    validate_state(state, capacity)
    assert class_budgets(config) == {"interactive": 4, "batch": 4}
    pools = {p.id: (p.tp, p.replicas) for p in state.pools.values()}
    assert pools == {"interactive-tp4": (4, 1), "batch-tp2": (2, 2)}  # latency: large TP; throughput: replicas
    assert state.routes == {"interactive": {"interactive-tp4": 1.0}, "batch": {"batch-tp2": 1.0}}


def test_explicit_pools_and_routes(tmp_path, capacity):
    config = load_config(write(tmp_path, """
model: llama-3-8b
gpus: 4
pools:
  small: {tp: 1, replicas: 2, knobs: {max_batch_size: 64}}
  big: {tp: 2}
routes:
  interactive: {small: 0.5, big: 0.5}
  batch: {small: 1.0}
"""))
    state = initial_state(config, capacity)
    validate_state(state, capacity)
    assert state.pools["small"].engine.knobs.max_batch_size == 64
    assert state.gpus_used == 4


def test_documented_example_is_exactly_the_defaults():
    assert load_config(Path(__file__).parents[2] / "deploy" / "tpgate.example.yaml") == load_config()


def test_promotion_steps_must_increase_to_one(tmp_path):
    assert load_config().promotion.steps == [0.1, 0.5, 1.0]
    assert load_config(write(tmp_path, "promotion: {steps: [0.25, 1]}\n")).promotion.steps == [0.25, 1.0]
    for steps in ("[0.5, 0.2, 1]", "[0.1, 0.5]", "[0.5, 0.5, 1]"):
        with pytest.raises(UserError, match="promotion.steps must increase and end at 1"):
            load_config(write(tmp_path, f"promotion: {{steps: {steps}}}\n"))
    with pytest.raises(UserError, match="promotion.steps"):
        load_config(write(tmp_path, "promotion: {steps: [0, 1]}\n"))
