"""Security of a running `tpgate serve` (the session's shared gateway, with API keys, an admin token and Ray token
authentication): a client without the Ray token can neither join the cluster as a driver (the way a Ray job runs
code) nor call the GCS's internal endpoints; API keys, the admin token and the Ray token never appear in any log
file of the run or in any metric; every listening socket of the gateway's process tree is classified, and no tpgate
listener is beyond loopback; trial routes answer only the admin token.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import API_KEY, BATCH_KEY, RAY_TOKEN_FILE
from tests.processes import wait_until

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
WRONG_KEY = "sk-not-a-key-but-a-secret-all-the-same"
TRIAL_ROUTE = "trial-security-probe"
RAY_JOIN_TIMEOUT_S = 120.0

# Run in a clean interpreter without the test session's Ray token: calls the GCS's NodeInfo service with no token,
# a wrong one, and the right one (the control that shows the call itself is sound).
GCS_PROBE = """
import json, sys
import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

address, token = sys.argv[1], sys.argv[2]

def call(metadata):
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=20)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

print(json.dumps({"none": call(()), "wrong": call((("authorization", "Bearer " + "0" * 64),)),
                  "token": call((("authorization", "Bearer " + token),))}))
"""
JOIN_PROBE = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); print('JOINED')"


def tokenless_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}


def post_chat(gateway, *, token: str | None, route: str | None = None) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if route is not None:
        headers["x-workload-class"] = route
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def trial_route(gateway):
    """A trial route to the gateway's small pool, set through the controller as the tuner does."""
    import ray

    from gateway.control.client import ControlClient
    from gateway.control.controller import CONTROLLER_NAME, NAMESPACE

    port = gateway.ray_address().rsplit(":", 1)[1]
    ray.init(address=f"127.0.0.1:{port}", namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
    try:
        client = ControlClient(name=CONTROLLER_NAME, namespace=NAMESPACE, timeout_s=15)
        _run(client.set_route(TRIAL_ROUTE, {"small-tp1": 1.0}, trial_class="interactive"))
        try:
            wait_until(lambda: post_chat(gateway, token=gateway.admin_token, route=TRIAL_ROUTE)[0] == 200,
                       timeout_s=20, what="the trial route")
            yield TRIAL_ROUTE
        finally:
            _run(client.remove_route(TRIAL_ROUTE))
    finally:
        ray.shutdown()


def _run(coroutine):
    import asyncio

    return asyncio.run(coroutine)


def test_trial_routes_answer_the_admin_token_and_no_api_key(gateway, trial_route):
    user_status, user_body = post_chat(gateway, token=API_KEY, route=trial_route)
    batch_status, _ = post_chat(gateway, token=BATCH_KEY, route=trial_route)
    admin_status, _ = post_chat(gateway, token=gateway.admin_token, route=trial_route)
    absent_status, _ = post_chat(gateway, token=API_KEY, route="trial-that-does-not-exist")
    print(f"trial route: API key {user_status}, batch key {batch_status}, admin token {admin_status}")
    assert (user_status, batch_status, absent_status) == (403, 403, 403)
    assert user_body["error"]["code"] == "trial_route_forbidden"
    assert admin_status == 200
    assert post_chat(gateway, token=API_KEY)[0] == 200  # the key itself is fine for production classes


def test_a_client_without_the_ray_token_cannot_call_the_gcs(gateway):
    address = gateway.ray_address()
    probe = subprocess.run([sys.executable, "-c", GCS_PROBE, address, RAY_TOKEN_FILE.read_text().strip()],
                           env=tokenless_env(), capture_output=True, text=True, timeout=90)
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout)
    print(f"GCS NodeInfo at {address}: {result}")
    assert result == {"none": "UNAUTHENTICATED", "wrong": "UNAUTHENTICATED", "token": "OK"}


def test_a_client_without_the_ray_token_cannot_join_as_a_driver(gateway, tmp_path):
    wrong_token = tmp_path / "wrong-token"
    wrong_token.write_text("0" * 64 + "\n")
    wrong_token.chmod(0o600)
    attempts = {
        "no token": tokenless_env(),
        "wrong token": {**tokenless_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong_token)},
    }
    running = {name: subprocess.Popen([sys.executable, "-c", JOIN_PROBE, gateway.ray_address()], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name, env in attempts.items()}
    outcomes = {}
    for name, process in running.items():
        try:
            output, _ = process.communicate(timeout=RAY_JOIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        outcomes[name] = (process.returncode, output)
        print(f"ray.init with {name}: exit {process.returncode}: {output.strip().splitlines()[-1:]}")
    for name, (returncode, output) in outcomes.items():
        assert returncode != 0 and "JOINED" not in output, f"{name}: joined the cluster:\n{output[-2000:]}"


@dataclass(frozen=True)
class Listener:
    pid: int
    owner: str
    address: str
    port: int
    kind: str  # "tpgate", "ray" (Ray's internal services) or "other"

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address.split("%")[0]).is_loopback


def _process_tree(root_pid: int) -> dict[int, psutil.Process]:
    root = psutil.Process(root_pid)
    return {p.pid: p for p in [root, *root.children(recursive=True)]}


def _owner(process: psutil.Process) -> str:
    """``tpgate <verb>`` for tpgate's own processes, ``ray::<actor>`` for Ray workers, else the process name."""
    try:
        argv, name = process.cmdline(), process.name()
    except psutil.Error:
        return "?"
    if "gateway.cli" in argv:
        return "tpgate " + argv[argv.index("gateway.cli") + 1]
    if argv and argv[0].startswith("ray::"):
        return argv[0].split()[0]
    if name.startswith("python") and len(argv) > 1:
        return " ".join(Path(arg).name for arg in argv[1:3])
    return name


def ray_registered_ports(gateway) -> dict[int, set[int]]:
    """pid -> the ports Ray's GCS knows that process by (asked with the token): the GCS's own, each node's
    (raylet, object manager, agents, metrics export), each actor's and each driver's core-worker port. Pid 0:
    ports whose process the GCS does not name (a node's)."""
    import grpc
    from ray.core.generated import gcs_service_pb2 as pb
    from ray.core.generated import gcs_service_pb2_grpc as rpc

    address = gateway.ray_address()
    metadata = (("authorization", "Bearer " + RAY_TOKEN_FILE.read_text().strip()),)
    ports: dict[int, set[int]] = {0: {int(address.rsplit(":", 1)[1])}}
    with grpc.insecure_channel(address) as channel:
        nodes = rpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(pb.GetAllNodeInfoRequest(), metadata=metadata,
                                                                   timeout=20)
        actors = rpc.ActorInfoGcsServiceStub(channel).GetAllActorInfo(pb.GetAllActorInfoRequest(),
                                                                      metadata=metadata, timeout=20)
        jobs = rpc.JobInfoGcsServiceStub(channel).GetAllJobInfo(pb.GetAllJobInfoRequest(), metadata=metadata,
                                                                timeout=20)
    for node in nodes.node_info_list:
        ports[0] |= {node.node_manager_port, node.object_manager_port, node.metrics_export_port,
                     node.runtime_env_agent_port, node.metrics_agent_port, node.dashboard_agent_listen_port}
    for actor in actors.actor_table_data:
        ports.setdefault(actor.pid, set()).add(actor.address.port)
    for job in jobs.job_info_list:
        ports.setdefault(job.driver_pid, set()).add(job.driver_address.port)
    return ports


def _grpc_checks_the_ray_token(port: int) -> bool:
    """Whether the gRPC server on ``port`` is Serve's inter-deployment server and checks the Ray token: a call
    without the token is UNAUTHENTICATED, the same call with it gets past the check."""
    import grpc

    def code(metadata: tuple[tuple[str, str], ...]) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", metadata=metadata, timeout=5)
                return "OK"
            except grpc.RpcError as exc:
                return str(exc.code().name)

    token = (("authorization", "Bearer " + RAY_TOKEN_FILE.read_text().strip()),)
    return code(()) == "UNAUTHENTICATED" and code(token) not in ("UNAUTHENTICATED", "UNIMPLEMENTED", "UNAVAILABLE")


def _is_ray_process(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        argv = process.cmdline()
        return bool(argv) and (argv[0].startswith("ray::") or any("/site-packages/ray/" in arg for arg in argv[:3]))
    return False


def classify_listeners(gateway) -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) of the gateway's process tree:

    - tpgate: HAProxy, the engines, the gateway's port, and a Serve replica's or proxy's listener that is not Ray's
      (Serve's ingress for tpgate's applications);
    - ray: a port Ray's GCS registered for that process or its node (GCS, raylet, agents, core workers, the driver
      in tpgate serve), Serve's inter-deployment gRPC server shown to check the Ray token, or another listener of
      a process of Ray's own (the dashboard head);
    - other: anything else.
    """
    tree = _process_tree(gateway.process.pid)
    registered = ray_registered_ports(gateway)
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in tree:
            continue
        process, port = tree[conn.pid], conn.laddr.port
        owner = _owner(process)
        if owner in ("haproxy", "tpgate engine") or port == int(gateway.url.rsplit(":", 1)[1]):
            kind = "tpgate"
        elif port in registered.get(conn.pid, set()) or port in registered[0]:
            kind = "ray"
        elif owner.startswith(("ray::ServeReplica", "ray::ProxyActor")):
            kind = "ray" if _grpc_checks_the_ray_token(port) else "tpgate"
        elif _is_ray_process(process):
            kind = "ray"
        else:
            kind = "other"
        found.append(Listener(conn.pid, owner, conn.laddr.ip, port, kind))
    return found


def test_every_listener_is_classified_and_no_tpgate_listener_is_beyond_loopback(gateway):
    listeners = classify_listeners(gateway)
    for item in sorted(listeners, key=lambda item: (item.kind, item.owner, item.port)):
        print(f"{item.kind:7} {item.owner:45} {item.address}:{item.port}")
    kinds = {item.kind for item in listeners}
    assert {"tpgate", "ray"} <= kinds
    engines = [item for item in listeners if item.owner == "tpgate engine"]
    assert {item.port for item in engines} == gateway.engine_ports()
    exposed = [item for item in listeners if item.kind in ("tpgate", "other") and not item.loopback]
    assert exposed == [], f"listeners beyond loopback that the configuration did not ask for: {exposed}"


def _run_files(gateway) -> list[Path]:
    """Every log file of the run: tpgate serve's output, and Ray's session directory (Serve's controller, proxy and
    replicas, their access logs, the engines' output, this gateway's Ray messages)."""
    logs_line = next(line for line in gateway.log_path.read_text().splitlines() if line.strip().startswith("logs: "))
    session_logs = Path(logs_line.split()[1])
    files = [gateway.log_path, *(p for p in session_logs.rglob("*") if p.is_file())]
    assert len(files) > 20, f"expected Ray's session logs under {session_logs}"
    return files


def _ray_metrics_ports(gateway) -> list[int]:
    """Ray's metrics export ports in the tree (HTTP answering /metrics without a token)."""
    ports = []
    for item in classify_listeners(gateway):
        if item.kind == "ray" and item.owner == "ray::DashboardAgent":
            url = f"http://127.0.0.1:{item.port}/metrics"
            # a gRPC port answers no HTTP
            with contextlib.suppress(OSError, ValueError, http.client.HTTPException), \
                    urllib.request.urlopen(url, timeout=5) as resp:
                if b"# TYPE" in resp.read(65536):
                    ports.append(item.port)
    return ports


def test_secrets_never_appear_in_logs_or_metrics(gateway, trial_route):
    # traffic that carries every secret: keys right and wrong, the admin token on the admin API and a trial route
    assert post_chat(gateway, token=API_KEY)[0] == 200
    assert post_chat(gateway, token=BATCH_KEY)[0] == 200
    assert post_chat(gateway, token=WRONG_KEY)[0] == 401
    assert post_chat(gateway, token=gateway.admin_token, route=trial_route)[0] == 200
    assert gateway.status()["pools"]
    secrets = {"API key": API_KEY, "batch API key": BATCH_KEY, "wrong API key": WRONG_KEY,
               "admin token": gateway.admin_token, "Ray token": RAY_TOKEN_FILE.read_text().strip()}
    files = _run_files(gateway)
    leaks = []
    for path in files:
        with contextlib.suppress(OSError):
            content = path.read_bytes()
            leaks += [(name, str(path)) for name, secret in secrets.items() if secret.encode() in content]
    expositions = {"router": gateway.metrics()}
    for port in gateway.engine_ports():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            expositions[f"engine :{port}"] = resp.read().decode()
    for port in _ray_metrics_ports(gateway):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            expositions[f"ray metrics :{port}"] = resp.read().decode()
    leaks += [(name, where) for where, text in expositions.items() for name, secret in secrets.items()
              if secret in text]
    print(f"searched {len(files)} log files and {len(expositions)} metric expositions for {len(secrets)} secrets")
    assert len(expositions) >= 2 + len(gateway.engine_ports()) - 1
    assert leaks == []
