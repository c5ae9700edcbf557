"""The HAProxy guard: wildcard listeners move to loopback, the admin socket becomes private, and anything it
cannot confine stops HAProxy from starting."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gateway.cluster import haproxy_guard
from gateway.cluster.haproxy_guard import EXIT_UNSAFE, HEADER_TIMEOUT, UnsafeListener, confine

FRONT = "127.0.0.1:8000"

# The listener lines of Ray 2.60's template as it renders them (haproxy_templates.py)
RAY_LISTENERS = """\
global
    stats socket /run/tpg/node/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
"""


def bind_addresses(config: str) -> list[str]:
    return [line.split()[1] for line in config.splitlines() if line.split()[:1] == ["bind"]]


def test_wildcard_listeners_move_to_loopback_and_the_admin_socket_becomes_private():
    confined = confine(RAY_LISTENERS, front=FRONT)
    assert bind_addresses(confined) == ["127.0.0.1:9101", "127.0.0.1:8000", "127.0.0.1:8404"]
    assert "stats socket /run/tpg/node/admin.sock mode 600 level admin expose-fd listeners" in confined
    assert "mode 666" not in confined


def test_confining_twice_changes_nothing():
    once = confine(RAY_LISTENERS, front=FRONT)
    assert confine(once, front=FRONT) == once


def test_everything_else_is_left_as_it_was():
    config = ("defaults\n    timeout connect 5s  # bind *:1 in a comment\n    timeout http-request 7s\n"
              "backend b\n    server r 10.0.0.5:30000 check\n")
    assert confine(config, front=FRONT) == config


def test_a_defaults_section_without_a_header_timeout_gets_one():
    confined = confine("defaults\n    timeout client 3600s\nfrontend f\n    bind 127.0.0.1:1\n", front=FRONT)
    assert confined.splitlines()[:2] == ["defaults", HEADER_TIMEOUT.rstrip("\n")]
    assert HEADER_TIMEOUT.split("#")[0].split() == ["timeout", "http-request", "10s"]
    assert confine(confined, front=FRONT) == confined


def test_the_front_address_may_be_public():
    config = "frontend f\n    bind 0.0.0.0:8000\nlisten stats\n  bind *:8404\n"
    assert bind_addresses(confine(config, front="0.0.0.0:8000")) == ["0.0.0.0:8000", "127.0.0.1:8404"]


@pytest.mark.parametrize("address", ["ipv4@*:9101", "ipv4@0.0.0.0:9101", "0.0.0.0:9101"])
def test_wildcard_spellings(address):
    assert bind_addresses(confine(f"    bind {address}\n", front=FRONT))[0].endswith("127.0.0.1:9101")


@pytest.mark.parametrize("address", ["127.0.0.2:1", "[::1]:1", "ipv6@[::1]:1", "/run/x.sock", "unix@/run/x.sock"])
def test_loopback_and_unix_listeners_pass(address):
    assert bind_addresses(confine(f"    bind {address}\n", front=FRONT)) == [address]


@pytest.mark.parametrize(
    "line",
    [
        "    bind 192.0.2.7:8404",
        "    bind [::]:8404",
        "    bind :::8404",
        "    bind 127.0.0.1:1,10.1.1.1:2",
        "    bind abns@haproxy",
        "    bind fd@3",
        "    bind nonsense",
        "    stats socket ipv4@0.0.0.0:9999 level admin",
        "    peer other 10.0.0.2:10000",
    ],
)
def test_what_cannot_be_confined_is_refused_with_its_line(line):
    with pytest.raises(UnsafeListener, match="line 2"):
        confine(f"global\n{line}\n", front=FRONT)


def test_an_admin_socket_without_a_mode_gets_one():
    assert confine("    stats socket /s level admin\n", front=FRONT) == "    stats socket /s level admin mode 600\n"


def test_ray_2_60s_own_configuration_is_confined(tmp_path):
    """Contract with Ray's template: render the configuration as Ray does and confine it."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=8123), socket_path=str(tmp_path / "a.sock"),
                        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "state"),
                        metrics_socket_path=str(tmp_path / "m.sock"), stats_port=8404, metrics_port=9101)
    api = HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    rendered = (tmp_path / "haproxy.cfg").read_text()
    assert "bind *:8404" in rendered and "bind :9101" in rendered  # what the guard exists for

    confined = confine(rendered, front="127.0.0.1:8123")
    assert sorted(bind_addresses(confined)) == ["127.0.0.1:8123", "127.0.0.1:8404", "127.0.0.1:9101"]
    assert " mode 600 level admin" in confined
    assert "timeout http-request" not in rendered and HEADER_TIMEOUT in confined  # Ray sets none: the guard does


def test_front_rules_go_into_the_front_once_and_nowhere_else(tmp_path):
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=8123), socket_path=str(tmp_path / "a.sock"),
                        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "state"),
                        metrics_socket_path=str(tmp_path / "m.sock"), stats_port=8404, metrics_port=9101)
    HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))._generate_config_file_internal()
    rules = ["http-request set-header x-a ?1", "http-request set-header x-b %[date(0,us)]"]

    once = confine((tmp_path / "haproxy.cfg").read_text(), front="127.0.0.1:8123", front_rules=rules)

    assert confine(once, front="127.0.0.1:8123", front_rules=rules) == once
    lines = [line.strip() for line in once.splitlines()]
    front = lines.index("bind 127.0.0.1:8123")
    assert lines[front - 1] == "frontend http_frontend" and lines[front + 1:front + 3] == rules
    assert all(lines.count(rule) == 1 for rule in rules)


def test_main_rewrites_the_file_then_execs_haproxy_with_the_same_arguments(tmp_path, monkeypatch):
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_LISTENERS)
    calls = []
    monkeypatch.setattr(haproxy_guard.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setattr(haproxy_guard, "die_with_parent", lambda: None)

    argv = ["-db", "-f", str(config), "-dR", "-sf", "41"]
    haproxy_guard.main(["--real", "/opt/haproxy", "--front", FRONT, "--", *argv])

    assert calls == [("/opt/haproxy", ["/opt/haproxy", *argv])]
    assert bind_addresses(config.read_text()) == ["127.0.0.1:9101", "127.0.0.1:8000", "127.0.0.1:8404"]


def test_main_refuses_an_unsafe_configuration_without_starting_haproxy(tmp_path, monkeypatch, capsys):
    config = tmp_path / "haproxy.cfg"
    config.write_text("listen stats\n  bind 192.0.2.7:8404\n")
    monkeypatch.setattr(haproxy_guard.os, "execv", lambda path, argv: pytest.fail("HAProxy was started"))

    assert haproxy_guard.main(["--real", "/opt/haproxy", "--front", FRONT, "--", "-f", str(config)]) == EXIT_UNSAFE
    assert "192.0.2.7:8404" in capsys.readouterr().err
    assert config.read_text() == "listen stats\n  bind 192.0.2.7:8404\n"


def test_prepare_makes_a_private_directory_and_points_ray_at_it():
    runtime_dir, env = haproxy_guard.prepare(front_host="127.0.0.1", front_port=8000,
                                             environ={"RAY_SERVE_HAPROXY_STATS_PORT": "18404"})
    try:
        assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
        launcher = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
        assert launcher.parent == runtime_dir and launcher.stat().st_mode & stat.S_IXUSR
        assert "--front 127.0.0.1:8000" in launcher.read_text()
        for name in ("CONFIG_FILE_LOC", "SOCKET_PATH", "METRICS_SOCKET_PATH", "SERVER_STATE_FILE"):
            assert Path(env[f"RAY_SERVE_HAPROXY_{name}"]).parent == runtime_dir
        assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"  # the operator's choice stands
        assert int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]) > 0 and int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) > 0
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    finally:
        for child in runtime_dir.iterdir():
            child.unlink()
        runtime_dir.rmdir()
