import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser, main
from gateway.commands.load import parse_duration_s
from gateway.errors import UserError
from tests.processes import free_port


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("60s", 60.0), ("2m", 120.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("500ms", 0.5), (" 5S ", 5.0)],
)
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "1m 30s", "s", "-5", "0", "nan", "inf"])
def test_bad_durations(text):
    with pytest.raises(UserError, match="--duration"):
        parse_duration_s(text)


def test_zero_warmup_is_allowed():
    assert parse_duration_s("0", flag="--warmup", allow_zero=True) == 0.0


def test_load_is_a_subcommand_with_bounded_defaults():
    args = build_parser().parse_args(["load", "--profile", "batch"])
    assert args.host == "http://127.0.0.1:8000"
    assert args.duration is None and args.max_requests is None and args.allow_remote is False


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--profile", "batch", "--host", "http://10.1.2.3:8000"], "not a loopback address; pass --allow-remote"),
        (["--profile", "batch", "--users", "0"], "users: Input should be greater than or equal to 1"),
        (["--profile", "batch", "--duration", "soon"], "--duration 'soon': expected seconds"),
        (["--profile", "batch", "--warmup", "-1"], "--warmup '-1': must be zero or more"),
        (["--host", "http://127.0.0.1:1"], "the following arguments are required: --profile"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    status, out, err = run(capsys, "load", *argv)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("tpgate: error: ")
    assert message in err


@pytest.mark.integration
@pytest.mark.parametrize("model", [[], ["--model", "m"]], ids=["discovering-the-model", "model-given"])
def test_a_gateway_that_is_not_running_is_one_line_connection_refused_and_status_1(model):
    port = free_port()  # nobody listens there
    script = Path(sys.executable).with_name("tpgate")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]
    done = subprocess.run(
        [*argv, "load", "--profile", "interactive", "--host", f"http://127.0.0.1:{port}", "--duration", "20s",
         "--warmup", "0", *model],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    *progress, last = done.stderr.splitlines()
    assert last == f"tpgate: load test failed: connection refused at http://127.0.0.1:{port}"
    assert all(line.startswith("[") and "warm-up" in line for line in progress)  # a slow start may show progress
    assert "HTTP 0" not in done.stderr and "Traceback" not in done.stderr
