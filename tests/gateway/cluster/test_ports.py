"""The port check before Ray starts: a port taken is refused in one line naming it and where it was set."""

import socket

import pytest

from gateway.cluster.ports import check_ports_free, port_problem, wanted_ports
from gateway.config import load_config
from gateway.errors import UserError


@pytest.fixture
def listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def config_on(port, fast_path="haproxy"):
    return load_config(None, environ={}, overrides={"server.port": port, "server.fast_path": fast_path})


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_port_someone_listens_on_is_in_use(listening):
    assert port_problem("127.0.0.1", listening) == "already in use"
    assert port_problem("0.0.0.0", listening) == "already in use"  # a wildcard listener would need it too


def test_a_port_a_stopped_server_left_in_time_wait_is_free():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers (a gateway before) set it
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
        client.close()
    assert port_problem("127.0.0.1", port) is None


def test_an_address_not_on_this_machine_is_named():
    assert port_problem("192.0.2.123", free_port()) is not None  # TEST-NET-1: never a local address
    assert port_problem("no-such-host.invalid", free_port()).startswith("unknown host")


def test_the_front_port_in_use_is_refused_in_one_line(listening):
    with pytest.raises(UserError) as info:
        check_ports_free(config_on(listening), {})
    message = str(info.value)
    assert message == (f"port {listening} on 127.0.0.1 (server.port, --port) is already in use: another tpgate serve "
                       f"or another server listens there; stop it or choose another port")


def test_haproxy_ports_the_operator_set_are_checked_on_loopback(listening):
    front = free_port()
    environ = {"RAY_SERVE_HAPROXY_METRICS_PORT": str(listening)}
    with pytest.raises(UserError, match=f"port {listening} on 127.0.0.1 \\(RAY_SERVE_HAPROXY_METRICS_PORT\\)"):
        check_ports_free(config_on(front), environ)
    check_ports_free(config_on(front, fast_path="standard"), environ)  # no HAProxy: not its port
    assert [w.source for w in wanted_ports(config_on(front), {})] == ["server.port, --port"]


def test_a_haproxy_port_that_is_not_a_number_is_named():
    with pytest.raises(UserError, match="RAY_SERVE_HAPROXY_STATS_PORT='eighty' is not a port number"):
        check_ports_free(config_on(free_port()), {"RAY_SERVE_HAPROXY_STATS_PORT": "eighty"})
