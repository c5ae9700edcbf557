"""The admin API over a real controller (recording deployer) and the tuning service (a stand-in study engine),
served by uvicorn on loopback: auth on every route of the schema, state, pools, routes, studies, promotions, and
the reason of every refusal."""

import aiohttp
import pytest

from gateway.admin.app import build_app
from gateway.admin.surface import AdminSurface
from gateway.cluster.builders import controller_settings
from gateway.cluster.lifecycle import capacity_of
from gateway.cluster.tuning_service import TuningService
from gateway.config import load_config
from gateway.control.controller import Controller
from gateway.control.initial_state import initial_state
from gateway.dataplane.auth import secret_digest
from gateway.dataplane.metrics import GatewayMetrics
from loadtests import load_profile
from tests.gateway.admin.local import LocalControl, StandInEngine
from tests.gateway.asgi_server import serve_asgi
from tests.gateway.control.test_controller import RecordingDeployer

TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 4
engine: {{time_scale: 10}}
pools:
  inter: {{tp: 1}}
  bat: {{tp: 1}}
routes:
  interactive: {{inter: 1.0}}
  batch: {{bat: 1.0}}
state_file: {state}
"""


class Admin:
    def __init__(self, url, session, controller, engine, service):
        self.url, self.session, self.controller, self.engine, self.service = url, session, controller, engine, service

    async def call(self, method, path, *, json=None, headers=AUTH):
        async with self.session.request(method, self.url + path, json=json, headers=headers) as resp:
            body = await resp.json(content_type=None) if resp.content_type == "application/json" else await resp.text()
            return resp.status, body


@pytest.fixture
async def admin(tmp_path):
    path = tmp_path / "tpgate.yaml"
    path.write_text(CONFIG.format(state=tmp_path / "state.json"))
    config = load_config(path)
    capacity = capacity_of(config)
    controller = Controller(controller_settings(config, capacity), RecordingDeployer())
    await controller.apply(initial_state(config, capacity))
    control = LocalControl(controller)
    engine = StandInEngine(wait=True)
    service = TuningService(config, control=control, admin_token=TOKEN, engine=engine,
                            storage=f"sqlite:///{tmp_path / 'tune.db'}")
    app = build_app(config, capacity, control, service)
    surface = AdminSurface(app, admin_digest=secret_digest(TOKEN), metrics=GatewayMetrics(), sink=control)
    async with serve_asgi(surface) as url, aiohttp.ClientSession() as session:
        yield Admin(url, session, controller, engine, service)
        engine.release.set()
        await service.shutdown()


async def test_every_route_in_the_schema_answers_401_without_a_token_and_403_with_a_wrong_one(admin):
    status, schema = await admin.call("GET", "/admin/openapi.json")
    assert status == 200
    operations = [(method.upper(), path) for path, methods in schema["paths"].items() for method in methods]
    assert len(operations) >= 16
    for method, path in [*operations, ("GET", "/admin/openapi.json"), ("GET", "/admin/no-such-thing")]:
        concrete = path.replace("{pool_id}", "inter").replace("{class_name}", "batch") \
            .replace("{study_id}", "s").replace("{promotion_id}", "p")
        status, body = await admin.call(method, concrete, headers={})
        assert status == 401 and body["error"]["type"] == "authentication_error", (method, path)
        status, body = await admin.call(method, concrete, headers={"Authorization": "Bearer not-it"})
        assert status == 403 and body["error"]["code"] == "invalid_admin_token", (method, path)
    assert all("security" in op for methods in schema["paths"].values() for op in methods.values())


async def test_state_shows_pools_routes_budget_and_events(admin):
    status, state = await admin.call("GET", "/admin/state")
    assert status == 200
    assert state["gpus"] == {"budget": 4, "used": 2, "free": 2}
    assert state["routes"] == {"interactive": {"inter": 1.0}, "batch": {"bat": 1.0}}
    assert state["pools"]["bat"]["tp"] == 1 and state["pools"]["bat"]["trial"] is False
    assert state["pools"]["bat"]["engine"]["knobs"]["cache_max_entry_count"] == 0.8
    assert state["promotions"] == [] and state["studies"] == [] and state["trial_routes"] == {}
    assert any(e["kind"] == "state.changed" for e in state["events"])


async def test_pools_are_added_resized_removed_and_refused_with_reasons(admin):
    status, body = await admin.call("POST", "/admin/pools", json={"id": "odd", "tp": 3})
    assert status == 400 and "not divisible by 3" in body["error"]["message"]
    status, body = await admin.call("POST", "/admin/pools", json={"id": "big", "tp": 2, "replicas": 2})
    assert status == 409 and "pools need 6 GPUs" in body["error"]["message"]
    assert "more than the budget of 4" in body["error"]["message"]
    status, body = await admin.call("POST", "/admin/pools", json={"id": "Bad_Id", "tp": 1})
    assert status == 400 and "pool id 'Bad_Id'" in body["error"]["message"]
    status, body = await admin.call("POST", "/admin/pools", json={"id": "extra", "tp": 1, "knobs": {"quant_policy": 3}})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = await admin.call("POST", "/admin/pools", json={"id": "extra", "tp": 2,
                                                                   "knobs": {"max_batch_size": 256}})
    assert status == 201 and body["id"] == "extra"
    status, pool = await admin.call("GET", "/admin/pools/extra")
    assert (pool["tp"], pool["replicas"], pool["engine"]["knobs"]["max_batch_size"]) == (2, 1, 256)
    assert (await admin.call("GET", "/admin/pools/nope"))[0] == 404
    assert (await admin.call("DELETE", "/admin/pools/nope"))[0] == 404
    status, body = await admin.call("DELETE", "/admin/pools/bat")
    assert status == 409 and "only pool of route 'batch'" in body["error"]["message"]
    status, body = await admin.call("DELETE", "/admin/pools/extra")
    assert status == 202 and body["draining"] is True
    assert "extra" not in admin.controller.desired_state().pools


async def test_routes_are_set_and_refused_with_reasons(admin):
    assert (await admin.call("PUT", "/admin/routes/realtime", json={"weights": {"bat": 1}}))[0] == 404
    status, body = await admin.call("PUT", "/admin/routes/batch", json={"weights": {"bat": 0.5}})
    assert status == 400 and "sum to 1" in body["error"]["message"]
    status, body = await admin.call("PUT", "/admin/routes/batch", json={"weights": {"ghost": 1.0}})
    assert status == 400 and "unknown pools ['ghost']" in body["error"]["message"]
    status, body = await admin.call("PUT", "/admin/routes/batch", json={"weights": {"bat": 0.5, "inter": 0.5}})
    assert status == 200 and admin.controller.desired_state().routes["batch"] == {"bat": 0.5, "inter": 0.5}
    status, body = await admin.call("PUT", "/admin/routes/batch", json={"weights": "all"})
    assert status == 400 and body["error"]["message"].startswith("weights: ")


async def test_a_study_runs_once_per_class_and_its_winner_is_promoted(admin):
    status, study = await admin.call("POST", "/admin/tuning", json={"class": "batch", "trials": 3, "window_s": 5})
    assert status == 202 and study["state"] == "running" and study["gpus"] == 2  # what production leaves free
    assert admin.engine.calls[0]["max_gpus"] == 2 and admin.engine.calls[0]["token"] == TOKEN
    status, body = await admin.call("POST", "/admin/tuning", json={"class": "batch"})
    assert status == 409 and f"being tuned by study {study['id']}" in body["error"]["message"]
    status, body = await admin.call("POST", "/admin/tuning", json={"class": "interactive"})
    assert status == 409 and "no GPU free for a study of class 'interactive'" in body["error"]["message"]
    assert "production pools use 2 (bat 1 x tp1, inter 1 x tp1), running studies hold 2" in body["error"]["message"]
    status, body = await admin.call("POST", f"/admin/tuning/{study['id']}/promote")
    assert status == 409 and "still running" in body["error"]["message"]
    status, detail = await admin.call("GET", f"/admin/tuning/{study['id']}")
    assert status == 200 and detail["trials_done"] == 1 and detail["best"]["label"].startswith("tp1x1")
    assert detail["progress"][-1].startswith("#0 [1/3]")
    admin.engine.release.set()
    await admin.service._studies[study["id"]].task
    status, listed = await admin.call("GET", "/admin/tuning")
    assert listed[0]["state"] == "completed" and listed[0]["best"]["outcome"] == "feasible"
    status, report = await admin.call("GET", f"/admin/tuning/{study['id']}/report")
    assert status == 200 and report.startswith("<!DOCTYPE html>") and "tp1x1" in report
    status, promotion = await admin.call("POST", f"/admin/tuning/{study['id']}/promote")
    assert status == 202 and promotion["phase"] == "starting" and promotion["candidate"]["id"].startswith("batch-tp1x1")
    status, state = await admin.call("GET", "/admin/state")
    assert state["studies"][0]["promotion"] == promotion["id"]
    assert state["promotions"][0]["id"] == promotion["id"]
    status, body = await admin.call("PUT", "/admin/routes/batch", json={"weights": {"bat": 1.0}})
    assert status == 409 and f"belongs to promotion {promotion['id']}" in body["error"]["message"]
    status, aborted = await admin.call("POST", f"/admin/promotions/{promotion['id']}/abort")
    assert status == 200 and aborted["phase"] == "rolled_back" and aborted["reason"] == "aborted by the operator"
    assert (await admin.call("GET", f"/admin/promotions/{promotion['id']}"))[1]["phase"] == "rolled_back"
    assert (await admin.call("GET", "/admin/promotions/nope"))[0] == 404
    assert (await admin.call("GET", "/admin/tuning/nope"))[0] == 404


async def test_a_study_is_stopped_and_a_stopped_one_without_a_winner_is_not_promoted(admin):
    admin.engine.outcome = "infeasible"
    status, study = await admin.call("POST", "/admin/tuning", json={"class": "interactive", "max_gpus": 1})
    assert status == 202 and study["gpus"] == 1
    status, stopped = await admin.call("POST", f"/admin/tuning/{study['id']}/stop")
    assert status == 200 and stopped["state"] == "stopped" and stopped["reason"] == "stopped by the operator"
    status, body = await admin.call("POST", f"/admin/tuning/{study['id']}/promote")
    assert status == 409 and "no feasible configuration to promote" in body["error"]["message"]
    status, body = await admin.call("POST", f"/admin/tuning/{study['id']}/promote", json={"trial": 0})
    assert status == 409 and "is infeasible, not feasible (broke TTFT p99)" in body["error"]["message"]


async def test_bad_study_requests_are_400(admin):
    status, body = await admin.call("POST", "/admin/tuning", json={"class": "batch", "trials": 0})
    assert status == 400 and "trials" in body["error"]["message"]
    status, body = await admin.call("POST", "/admin/tuning", json={"class": "batch", "knobs": {"quant_policy": [3]}})
    assert status == 400 and "quant_policy" in body["error"]["message"]
    assert (await admin.call("POST", "/admin/tuning", json={"class": "realtime"}))[0] == 404


LIVE_PROFILE = {"users": 40, "arrival": {"kind": "closed", "think_time_s": {"kind": "fixed", "value": 0}},
                "prompt_tokens": {"kind": "fixed", "value": 300}, "output_tokens": {"kind": "fixed", "value": 50},
                "duration_s": 60, "max_requests": 5000}


async def test_a_study_tunes_with_a_profile_of_its_own_instead_of_the_classs(admin):
    status, study = await admin.call("POST", "/admin/tuning", json={"class": "batch", "max_gpus": 1,
                                                                    "profile": LIVE_PROFILE})
    assert status == 202 and study["profile"].endswith(f"study-{study['id']}-profile.yaml"), study
    used = load_profile(admin.engine.calls[0]["profile"])  # what the study engine was given
    assert (used.users, used.prompt_tokens.value, used.max_requests) == (40, 300, 5000)
    status, state = await admin.call("GET", "/admin/state")
    assert state["studies"][0]["profile"] == study["profile"]  # kept with the study's reference
    status, body = await admin.call("POST", "/admin/tuning", json={"class": "interactive", "max_gpus": 1,
                                                                   "profile": {**LIVE_PROFILE, "users": 0}})
    assert status == 400 and "users" in body["error"]["message"], body
    assert len(admin.engine.calls) == 1  # the bad one never started


async def test_rollback_without_a_promotion_is_409(admin):
    status, body = await admin.call("POST", "/admin/routes/batch/rollback")
    assert status == 409 and body["error"]["message"] == "class 'batch' has no promotion to roll back"


async def test_a_configuration_of_ones_choice_is_promoted(admin):
    status, body = await admin.call("POST", "/admin/promotions", json={"class": "batch", "tp": 3})
    assert status == 400 and "not divisible by 3" in body["error"]["message"]
    status, body = await admin.call("POST", "/admin/promotions", json={"class": "batch", "tp": 4})
    assert status == 409 and "no room for the new pool" in body["error"]["message"]
    status, promotion = await admin.call("POST", "/admin/promotions", json={"class": "batch", "id": "bat-2",
                                                                            "tp": 1, "replicas": 2})
    assert status == 202 and promotion["candidate"]["id"] == "bat-2" and promotion["source"] == "api"
    status, listed = await admin.call("GET", "/admin/promotions")
    assert [p["id"] for p in listed] == [promotion["id"]]
    status, rolled = await admin.call("POST", "/admin/routes/batch/rollback")
    assert status == 202 and rolled["phase"] == "rolled_back" and rolled["reason"] == "rolled back by the operator"


DRIFTED = {"drifted": True, "reason": "drifted: concurrency 64 vs 16 (x4.0) for 300 s",
           "distances": {"concurrency": 4.0}, "live": {"concurrency_mean": 64.0, "prompt_median": 250.0},
           "reference": {"concurrency": 16.0},
           "decision": "advise", "decision_reason": "would re-tune on 2 GPUs", "valid_for_s": 90}


async def test_the_drift_monitors_verdicts_show_in_the_state_with_one_event_per_change(admin):
    status, kept = await admin.call("PUT", "/admin/drift/batch", json=DRIFTED)
    assert status == 200 and kept["drifted"] is True and kept["stale"] is False
    await admin.call("PUT", "/admin/drift/batch", json=DRIFTED)  # every interval: the same verdict again
    ended = {"result": "kept", "reason": "not better by the 5% margin", "study": "batch-1", "ended_unix_s": 1e9}
    await admin.call("PUT", "/admin/drift/batch", json={**DRIFTED, "drifted": False, "reason": "within bounds",
                                                         "retune": ended})
    status, state = await admin.call("GET", "/admin/state")
    assert status == 200
    shown = state["drift"]["batch"]
    assert shown["drifted"] is False and shown["live"]["concurrency_mean"] == 64
    assert shown["retune"] == {**ended, "promotion": None}
    events = [(e["kind"], e["route"]) for e in state["events"] if e["kind"].startswith(("drift.", "retune."))]
    assert events == [("drift.detected", "batch"), ("drift.cleared", "batch"), ("retune.kept", "batch")]
    status, listed = await admin.call("GET", "/admin/drift")
    assert status == 200 and set(listed) == {"batch"}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/admin/drift/nope", DRIFTED, 404, "class"),
    ("/admin/drift/batch", {**DRIFTED, "decision": "maybe"}, 400, None),
    ("/admin/drift/batch", {**DRIFTED, "valid_for_s": 0}, 400, None),
    ("/admin/drift/batch", {**DRIFTED, "surprise": 1}, 400, None),
    ("/admin/drift/batch", {**DRIFTED, "distances": {"concurrency": float("inf")}}, 400, "distances"),
    ("/admin/drift/batch", {**DRIFTED, "live": {"nested": [float("nan")]}}, 400, "live"),
])
async def test_bad_drift_verdicts_are_refused_with_the_reason(admin, path, body, status, param):
    got, answer = await admin.call("PUT", path, json=body)
    assert got == status, answer
    assert answer["error"]["message"]
    if param is not None:
        assert answer["error"]["param"] == param
    _, state = await admin.call("GET", "/admin/state")
    assert state["drift"] == {}  # nothing kept
