"""The lmdeploy launcher's command line, and the contract test: LMDeploy 0.18's own CLI parser reads it back.

The contract tests import ``lmdeploy`` (``make test`` installs it without a GPU: the ``lmdeploy-contract``
extra, then ``pip install --no-deps lmdeploy==0.18.0``). Without it they are skipped with the reason, unless
``REQUIRE_LMDEPLOY_CONTRACT=1`` (set by ``make test``) turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from gateway.engines import LAUNCHERS, get_launcher
from gateway.engines.base import EngineSpec
from gateway.engines.lmdeploy import LMDEPLOY_VERSION, LmdeployLauncher
from gateway.engines.sim.launcher import SimLauncher
from gateway.errors import UserError
from gateway.planner import EngineKnobs

HOST = "127.0.0.1"
PORT = 40123


def make_spec(*, tp: int = 1, extra_args: tuple[str, ...] = (), **knobs: object) -> EngineSpec:
    return EngineSpec(
        engine="lmdeploy",
        model="/models/InternVL2_5-38B",
        served_model_name="internvl2_5-38b",
        gpu="h100-80gb",
        tp=tp,
        knobs=EngineKnobs(**knobs),  # type: ignore[arg-type]
        extra_args=extra_args,
    )


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


# --- the argv, without LMDeploy -------------------------------------------------------------------------------


def test_turbomind_command_in_full():
    spec = make_spec(tp=4, max_batch_size=256, cache_max_entry_count=0.5, quant_policy=8, session_len=32768)
    argv = LmdeployLauncher(python="/venv/bin/python").command(spec, host=HOST, port=PORT)
    assert argv == [
        "/venv/bin/python", "-m", "lmdeploy", "serve", "api_server", "/models/InternVL2_5-38B",
        "--model-name", "internvl2_5-38b",
        "--server-name", "127.0.0.1",
        "--server-port", "40123",
        "--backend", "turbomind",
        "--tp", "4",
        "--cache-max-entry-count", "0.5",
        "--quant-policy", "8",
        "--max-prefill-token-num", "8192",
        "--max-batch-size", "256",
        "--session-len", "32768",
        "--distributed-executor-backend", "mp",
    ]  # fmt: skip


def test_default_interpreter_is_the_gateways_own():
    argv = LmdeployLauncher().command(make_spec(), host=HOST, port=PORT)
    assert argv[:5] == [sys.executable, "-m", "lmdeploy", "serve", "api_server"]


@pytest.mark.parametrize(
    ("knobs", "flag", "expected"),
    [
        ({"backend": "pytorch"}, "--backend", "pytorch"),
        ({"max_batch_size": 64}, "--max-batch-size", "64"),
        ({"cache_max_entry_count": 0.9}, "--cache-max-entry-count", "0.9"),
        ({"quant_policy": 4}, "--quant-policy", "4"),
        ({"session_len": 4096}, "--session-len", "4096"),
        ({"max_prefill_token_num": 2048}, "--max-prefill-token-num", "2048"),
    ],
)
def test_each_knob_maps_to_its_flag(knobs, flag, expected):
    argv = LmdeployLauncher().command(make_spec(**knobs), host=HOST, port=PORT)
    assert flag_value(argv, flag) == expected


def test_knobs_left_unset_leave_lmdeploy_its_defaults():
    argv = LmdeployLauncher().command(make_spec(), host=HOST, port=PORT)
    assert "--max-batch-size" not in argv  # LMDeploy picks it by GPU type
    assert "--session-len" not in argv  # LMDeploy reads the model's context length
    assert "--disable-metrics" not in argv  # metrics are on by default in 0.18; the tuner reads them


def test_served_model_name_and_address():
    argv = LmdeployLauncher().command(make_spec(), host="127.0.0.2", port=9)
    assert argv[5] == "/models/InternVL2_5-38B"
    assert flag_value(argv, "--model-name") == "internvl2_5-38b"
    assert flag_value(argv, "--server-name") == "127.0.0.2"
    assert flag_value(argv, "--server-port") == "9"


def test_pytorch_with_tp_above_one_uses_the_mp_executor_not_ray():
    argv = LmdeployLauncher().command(make_spec(tp=2, backend="pytorch"), host=HOST, port=PORT)
    assert flag_value(argv, "--distributed-executor-backend") == "mp"
    assert flag_value(argv, "--tp") == "2"


def test_turbomind_with_tp_above_one_names_the_mp_executor_for_lmdeploys_pytorch_fallback():
    # api_server --backend turbomind runs the PyTorch engine when TurboMind does not support the model
    argv = LmdeployLauncher().command(make_spec(tp=8, backend="turbomind"), host=HOST, port=PORT)
    assert flag_value(argv, "--distributed-executor-backend") == "mp"


@pytest.mark.parametrize("backend", ["pytorch", "turbomind"])
def test_no_executor_flag_with_one_gpu(backend):
    argv = LmdeployLauncher().command(make_spec(tp=1, backend=backend), host=HOST, port=PORT)
    assert "--distributed-executor-backend" not in argv


def test_extra_args_come_last_verbatim():
    extra = ("--log-level", "INFO", "--enable-prefix-caching")
    argv = LmdeployLauncher().command(make_spec(tp=2, backend="pytorch", extra_args=extra), host=HOST, port=PORT)
    assert tuple(argv[-3:]) == extra


def test_a_spec_for_another_engine_is_refused():
    spec = EngineSpec(engine="sim", model="internvl2_5-38b", served_model_name="m", gpu="h100-80gb", tp=1)
    with pytest.raises(ValueError, match="'sim'"):
        LmdeployLauncher().command(spec, host=HOST, port=PORT)


def test_environment_exposes_exactly_the_gpus_ray_assigned():
    env = LmdeployLauncher().environment(make_spec(tp=2), gpu_ids=["2", "3"])
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_environment_refuses_a_gpu_count_other_than_tp():
    with pytest.raises(ValueError, match=r"tp=4 needs 4 GPU ids, but Ray assigned 2: \['0', '1'\]"):
        LmdeployLauncher().environment(make_spec(tp=4), gpu_ids=["0", "1"])


# --- the registry -------------------------------------------------------------------------------------------


def test_registry_holds_both_engines_under_their_names():
    assert isinstance(get_launcher("lmdeploy"), LmdeployLauncher)
    assert isinstance(get_launcher("sim"), SimLauncher)
    assert sorted(LAUNCHERS) == ["lmdeploy", "sim"]


def test_registry_refuses_an_unknown_engine_naming_the_known_ones():
    with pytest.raises(UserError, match="unknown engine 'vllm'; known engines: lmdeploy, sim"):
        get_launcher("vllm")


# --- the contract: LMDeploy's own parser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lmdeploy_cli():
    """LMDeploy's top-level ``lmdeploy`` parser with ``serve api_server`` registered, as its entry point builds it."""
    try:
        import lmdeploy
        from lmdeploy.cli.cli import CLI
        from lmdeploy.cli.serve import SubCliServe
    except ImportError as exc:
        reason = (
            f"lmdeploy's CLI cannot be imported ({exc}); `make test` installs it without a GPU "
            f"(pip install -e '.[lmdeploy-contract]' && pip install --no-deps lmdeploy=={LMDEPLOY_VERSION})"
        )
        if os.environ.get("REQUIRE_LMDEPLOY_CONTRACT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    # LMDeploy's parsers are class attributes; registering a subcommand twice is an argparse error.
    if "api_server" not in SubCliServe.subparsers.choices:
        SubCliServe.add_parser_api_server()
    return lmdeploy, CLI.parser, SubCliServe


def parse_with_lmdeploy(lmdeploy_cli, argv: list[str]):
    _, parser, _ = lmdeploy_cli
    program = LmdeployLauncher().program()
    assert argv[: len(program)] == program
    try:
        return parser.parse_args(argv[len(program) :])
    except SystemExit as exc:  # argparse reports the bad argument on stderr, which pytest shows
        pytest.fail(f"LMDeploy's parser rejected the command (exit status {exc.code}): {argv}")


CONTRACT_CASES = {
    "turbomind-tp1-defaults": make_spec(),
    "turbomind-tp4-all-knobs": make_spec(
        tp=4,
        max_batch_size=256,
        cache_max_entry_count=0.5,
        quant_policy=8,
        session_len=32768,
        max_prefill_token_num=4096,
    ),
    "pytorch-tp1": make_spec(backend="pytorch", quant_policy=4),
    "pytorch-tp2-mp-extra-args": make_spec(
        tp=2,
        backend="pytorch",
        max_batch_size=128,
        extra_args=("--log-level", "INFO", "--enable-prefix-caching"),
    ),
}


@pytest.mark.parametrize("spec", CONTRACT_CASES.values(), ids=CONTRACT_CASES.keys())
def test_lmdeploy_parses_our_command_into_our_knobs(lmdeploy_cli, spec):
    _, _, sub_cli_serve = lmdeploy_cli
    args = parse_with_lmdeploy(lmdeploy_cli, LmdeployLauncher().command(spec, host=HOST, port=PORT))
    knobs = spec.knobs
    assert args.run is sub_cli_serve.api_server  # the `serve api_server` subcommand, not another
    assert args.model_path == spec.model
    assert args.model_name == spec.served_model_name
    assert (args.server_name, args.server_port) == (HOST, PORT)
    assert args.backend == knobs.backend
    assert args.tp == spec.tp
    assert args.max_batch_size == knobs.max_batch_size
    assert args.cache_max_entry_count == knobs.cache_max_entry_count
    assert args.quant_policy == knobs.quant_policy
    assert args.session_len == knobs.session_len
    assert args.max_prefill_token_num == knobs.max_prefill_token_num
    expected_executor = "mp" if spec.tp > 1 else None
    assert args.distributed_executor_backend == expected_executor
    assert args.disable_metrics is False


def test_lmdeploy_parses_the_extra_args_too(lmdeploy_cli):
    args = parse_with_lmdeploy(
        lmdeploy_cli, LmdeployLauncher().command(CONTRACT_CASES["pytorch-tp2-mp-extra-args"], host=HOST, port=PORT)
    )
    assert args.log_level == "INFO"
    assert args.enable_prefix_caching is True


def test_lmdeploy_parser_rejects_flags_it_does_not_know(lmdeploy_cli, capsys):
    """The contract can fail: 0.18 has no --enable-metrics (metrics are on unless --disable-metrics)."""
    _, parser, _ = lmdeploy_cli
    argv = LmdeployLauncher().command(make_spec(extra_args=("--enable-metrics",)), host=HOST, port=PORT)
    with pytest.raises(SystemExit):
        parser.parse_args(argv[len(LmdeployLauncher().program()) :])
    assert "unrecognized arguments: --enable-metrics" in capsys.readouterr().err


def test_installed_lmdeploy_is_the_release_the_launcher_targets(lmdeploy_cli):
    lmdeploy, _, _ = lmdeploy_cli
    assert lmdeploy.__version__ == LMDEPLOY_VERSION
    assert importlib.util.find_spec("lmdeploy.__main__") is not None  # `python -m lmdeploy` runs its CLI


def test_lmdeploy_parses_the_pools_engine_key_and_its_node_address(lmdeploy_cli):
    """On a cluster the engine listens on its node's address and requires the pool's key (``--api-keys``)."""
    spec = CONTRACT_CASES["pytorch-tp2-mp-extra-args"]
    argv = LmdeployLauncher().command(spec, host="10.0.0.7", port=PORT, api_key="k" * 64)
    args = parse_with_lmdeploy(lmdeploy_cli, argv)
    assert args.api_keys == ["k" * 64] and args.server_name == "10.0.0.7"
    assert args.log_level == "INFO"  # the extra args still come last and still parse
    assert "--api-keys" not in LmdeployLauncher().command(spec, host=HOST, port=PORT)
