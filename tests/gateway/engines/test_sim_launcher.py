"""The simulated engine's launcher and command line (pure: nothing is started)."""

from __future__ import annotations

import sys

import pytest

from gateway.cli import build_parser, main
from gateway.engines import get_launcher
from gateway.engines.base import EngineSpec
from gateway.engines.sim import SimEngineConfig, SimLauncher, resolve
from gateway.errors import UserError
from gateway.planner import EngineKnobs

SPEC = EngineSpec(
    engine="sim",
    model="internvl2_5-38b",
    served_model_name="internvl",
    gpu="h100-80gb",
    tp=4,
    knobs=EngineKnobs(max_batch_size=128, cache_max_entry_count=0.5, quant_policy=8, session_len=8192),
    time_scale=20.0,
    deviation_file="/tmp/deviation.yaml",
    extra_args=("--extra",),
)


def test_registered_under_sim():
    assert isinstance(get_launcher("sim"), SimLauncher)


def test_command_runs_tpgate_engine_sim_with_every_knob_and_parses_back():
    argv = SimLauncher().command(SPEC, host="127.0.0.1", port=9123)
    assert argv[:5] == [sys.executable, "-m", "gateway.cli", "engine", "sim"]
    assert argv[-1] == "--extra"
    args = build_parser().parse_args(argv[3:-1])
    assert (args.model, args.model_name, args.gpu, args.tp) == ("internvl2_5-38b", "internvl", "h100-80gb", 4)
    assert (args.host, args.port, args.time_scale) == ("127.0.0.1", 9123, 20.0)
    assert args.deviation_file == "/tmp/deviation.yaml"
    assert (args.max_batch_size, args.cache_max_entry_count, args.quant_policy, args.session_len) == (128, 0.5, 8, 8192)
    assert args.max_prefill_token_num == 8192


def test_optional_flags_are_left_out_when_unset():
    spec = EngineSpec(engine="sim", model="llama-2-7b", served_model_name="m", gpu="a100-80gb", tp=1)
    argv = SimLauncher().command(spec, host="127.0.0.1", port=1)
    assert "--max-batch-size" not in argv and "--session-len" not in argv and "--deviation" not in argv


def test_environment_passes_the_assigned_gpus_on():
    assert SimLauncher().environment(SPEC, gpu_ids=["2", "3"]) == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_resolve_takes_capacity_and_defaults_from_the_planner():
    setup = resolve(SimEngineConfig(model="llama-2-7b", gpu="a100-80gb", tp=1))
    assert setup.max_batch_size == 384  # LMDeploy's default on an A100
    assert setup.session_len == 4096
    assert setup.kv_cache_tokens == 105_592 // 64 * 64
    assert setup.served_model_name == "llama-2-7b"


def test_resolve_refuses_a_tp_the_planner_rejects():
    with pytest.raises(UserError, match="not divisible by 3"):
        resolve(SimEngineConfig(model="internvl2_5-38b", gpu="h100-80gb", tp=3))


def test_cli_exits_2_with_the_planners_reason(capsys: pytest.CaptureFixture[str]):
    assert main(["engine", "sim", "--model", "internvl2_5-38b", "--gpu", "h100-80gb", "--tp", "1"]) == 2
    assert "less than one 32,768-token session" in capsys.readouterr().err


def test_cli_rejects_bad_flag_values(capsys: pytest.CaptureFixture[str]):
    assert main(["engine", "sim", "--model", "llama-2-7b", "--time-scale", "0"]) == 2
    assert "time_scale" in capsys.readouterr().err
    assert main(["engine", "sim", "--model", "llama-2-7b", "--quant-policy", "3"]) == 2


def test_deviation_file_errors_are_user_errors(tmp_path):
    bad = tmp_path / "deviation.yaml"
    bad.write_text("allreduce_factor: fast\n")
    with pytest.raises(UserError, match="allreduce_factor must be a number"):
        resolve(SimEngineConfig(model="llama-2-7b", deviation_file=str(bad)))
    with pytest.raises(UserError, match="cannot read"):
        resolve(SimEngineConfig(model="llama-2-7b", deviation_file=str(tmp_path / "missing.yaml")))
    good = tmp_path / "deviation.json"
    good.write_text('{"decode_efficiency_factor_by_tp": {"2": 0.8}}')
    assert resolve(SimEngineConfig(model="llama-2-7b", deviation_file=str(good))).deviation.decode_factor(2) == 0.8


def test_a_forward_budget_below_one_kv_block_is_refused():
    with pytest.raises(UserError, match=r"max_prefill_token_num \+ max_batch_size \(2\) is less than one KV block"):
        resolve(SimEngineConfig.from_values({"model": "llama-2-7b", "gpu": "a100-80gb", "max_batch_size": 1,
                                             "max_prefill_token_num": 1}))
    limits = resolve(SimEngineConfig.from_values({"model": "llama-2-7b", "gpu": "a100-80gb"})).limits
    assert (limits.max_batch_size, limits.max_forward_tokens, limits.max_context_tokens) == (384, 8576, 4096)


def test_the_pools_engine_key_is_passed_as_lmdeploys_flag():
    spec = EngineSpec(engine="sim", model="llama-3-8b", served_model_name="m", gpu="a100-80gb", tp=1)
    argv = SimLauncher().command(spec, host="127.0.0.2", port=8001, api_key="pool-key")
    args = build_parser().parse_args(argv[argv.index("engine"):])
    assert args.api_keys == ["pool-key"] and args.host == "127.0.0.2"
