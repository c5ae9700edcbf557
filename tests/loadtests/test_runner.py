import itertools
from pathlib import Path

import pytest

from loadtests import LoadTestInputError, check_host, load_profile, run_load
from loadtests.env import API_KEY_ENV
from loadtests.runner import LOCUSTFILE, STARTUP_GRACE_S, hard_limit_s, locust_command


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("http://localhost:9", "http://localhost:9"),
        ("https://127.8.9.10", "https://127.8.9.10"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_loopback_hosts_are_allowed(host, expected):
    assert check_host(host) == expected


@pytest.mark.parametrize("host", ["http://10.0.0.5:8000", "http://example.com", "http://[2001:db8::1]:80",
                                  "http://0.0.0.0:8000"])
def test_other_hosts_need_allow_remote(host):
    with pytest.raises(LoadTestInputError, match="is not a loopback address; pass --allow-remote"):
        check_host(host)
    assert check_host(host, allow_remote=True) == host


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("127.0.0.1:8000", "must be an http:// or https:// URL"),
        ("ftp://127.0.0.1", "must be an http:// or https:// URL"),
        ("http://127.0.0.1:8000/v1", "must not have a path"),
    ],
)
def test_malformed_hosts(host, message):
    with pytest.raises(LoadTestInputError, match=message):
        check_host(host, allow_remote=True)


def test_run_load_refuses_a_remote_host_before_starting_anything(tmp_path):
    with pytest.raises(LoadTestInputError, match="not a loopback address"):
        run_load("interactive", "http://192.0.2.1:8000", json_path=tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_run_load_validates_overrides_before_starting_anything():
    with pytest.raises(LoadTestInputError, match="max_requests: Input should be greater than or equal to 1"):
        run_load("batch", "http://127.0.0.1:1", max_requests=0)


def test_locust_command_is_headless_bounded_and_keeps_the_key_out_of_argv():
    profile = load_profile("batch")
    argv = locust_command(profile, host="http://127.0.0.1:8000", profile_path=Path("/p.yaml"),
                          records_path=Path("/r.jsonl"))
    options = dict(itertools.pairwise(argv))  # each option with the word after it
    assert argv[1:3] == ["-m", "locust"]
    assert options["--locustfile"] == str(LOCUSTFILE) and LOCUSTFILE.is_file()
    assert "--headless" in argv and "--only-summary" in argv
    assert options["--host"] == "http://127.0.0.1:8000"
    assert options["--users"] == "256" and options["--spawn-rate"] == "64"
    assert options["--run-time"] == f"{int(profile.run_time_s + STARTUP_GRACE_S / 2)}s"  # locust's own backstop
    assert options["--stop-timeout"] == "60"
    assert options["--workload-profile"] == "/p.yaml" and options["--records"] == "/r.jsonl"
    assert not any("key" in arg.lower() for arg in argv)
    assert API_KEY_ENV.startswith("TPGATE_")


def test_hard_limit_covers_warmup_duration_and_drain():
    profile = load_profile("interactive")
    assert hard_limit_s(profile) == profile.warmup_s + profile.duration_s + profile.drain_timeout_s + STARTUP_GRACE_S
