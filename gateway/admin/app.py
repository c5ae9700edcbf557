"""The admin API's routes (FastAPI): pools, routes, tuning studies, promotions and the whole state.

It is not the hot path: every call goes to the controller (through its typed client) or to the tuning service,
both of which may run on another process. Refusals come back in the OpenAI error shape with the reason: 400 for
a request the planner or the schema rejects, 404 for an unknown pool, class, study or promotion, 409 for what
the current state does not allow (over the GPU budget, a promotion or study of the class in progress, no GPU free
for a study), 502 when a pool could not be deployed, 503 when the controller or the tuning service does not
answer. Authentication is the surface's (:mod:`gateway.admin.surface`), in front of every route; the schema
declares the bearer scheme on each operation.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from fastapi import Body, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.admin.models import (
    DriftIn,
    DriftOut,
    ErrorBody,
    GatewayState,
    PoolIn,
    PoolOut,
    PromoteIn,
    PromotionIn,
    PromotionOut,
    RouteIn,
    StudyDetail,
    StudyOut,
    Written,
)
from gateway.cluster.tuning_service import StudyConflict, StudyRejected, StudyRequest, UnknownStudy
from gateway.config import TpgateConfig
from gateway.control.client import Conflict, ControllerUnavailable, NotFound, PoolFailed, StateRejected
from gateway.control.initial_state import engine_spec
from gateway.control.state import Capacity, PoolSpec, StateError, is_trial_route, validate_pool
from gateway.errors import ApiError, error_body

TRIAL_POOL_PREFIX = "t-"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (400, "the request is invalid (the reason says which value)"),
        (401, "no bearer token"),
        (403, "a wrong bearer token"),
        (404, "no such pool, class, study or promotion"),
        (409, "not allowed in the current state (the reason has the numbers)"),
        (503, "the controller or the tuning service does not answer"),
    )
}


class ControlBackend(Protocol):
    """The controller's calls the admin API makes (:class:`gateway.control.client.ControlClient`)."""

    async def raw_status(self) -> dict[str, Any]: ...
    async def add_pool(self, pool: PoolSpec) -> int: ...
    async def remove_pool(self, pool_id: str) -> int: ...
    async def set_route(self, route: str, weights: Mapping[str, float]) -> int: ...
    async def promotions(self) -> list[dict[str, Any]]: ...
    async def promotion(self, promotion_id: str) -> dict[str, Any]: ...
    async def abort_promotion(self, promotion_id: str, reason: str = ...) -> dict[str, Any]: ...
    async def rollback_class(self, class_name: str) -> dict[str, Any]: ...
    async def start_promotion(self, class_name: str, pool: PoolSpec, *, source: str) -> dict[str, Any]: ...
    async def report_drift(self, class_name: str, report: Mapping[str, Any]) -> dict[str, Any]: ...


class TuningBackend(Protocol):
    """The tuning service's calls (:class:`gateway.admin.tuning_client.TuningClient`)."""

    async def start_study(self, request: Mapping[str, Any]) -> dict[str, Any]: ...
    async def studies(self) -> list[dict[str, Any]]: ...
    async def study(self, study_id: str) -> dict[str, Any]: ...
    async def stop_study(self, study_id: str) -> dict[str, Any]: ...
    async def report_html(self, study_id: str) -> str: ...
    async def promote(self, study_id: str, *, trial: int | None) -> dict[str, Any]: ...


class ServiceUnavailable(RuntimeError):
    """A backend did not answer (the tuning service is not running, or restarting)."""


def build_app(config: TpgateConfig, capacity: Capacity, control: ControlBackend, tuning: TuningBackend) -> FastAPI:
    """The admin API over ``control`` and ``tuning``, for the gateway configured by ``config``."""
    app = FastAPI(
        title="tpgate admin API", version="1", openapi_url="/admin/openapi.json", docs_url=None, redoc_url=None,
        description="Operate a tpgate gateway: pools, routes, online tuning, staged promotion with rollback. "
                    "Every call needs `Authorization: Bearer <admin token>`.",
        dependencies=[Security(HTTPBearer(auto_error=False, description="the admin token"))],
        responses=_ERRORS,
    )
    _add_error_handlers(app)
    classes = tuple(config.classes)

    def known_class(class_name: str) -> None:
        if class_name not in classes:
            raise ApiError(404, f"unknown class {class_name!r} (classes: {', '.join(classes)})", param="class")

    # --- state and pools ---------------------------------------------------------------------------------------

    @app.get("/admin/state", response_model=GatewayState, tags=["state"], summary="Everything, at a glance")
    async def get_state() -> dict[str, Any]:
        return gateway_state(await control.raw_status())

    @app.get("/admin/pools", response_model=list[PoolOut], tags=["pools"], summary="Every pool")
    async def list_pools() -> list[dict[str, Any]]:
        return list(gateway_state(await control.raw_status())["pools"].values())

    @app.get("/admin/pools/{pool_id}", response_model=PoolOut, tags=["pools"], summary="One pool")
    async def get_pool(pool_id: str) -> dict[str, Any]:
        pools = gateway_state(await control.raw_status())["pools"]
        if pool_id not in pools:
            raise ApiError(404, f"unknown pool {pool_id!r}", param="pool_id")
        return dict(pools[pool_id])

    @app.post("/admin/pools", response_model=Written, status_code=201, tags=["pools"],
              summary="Deploy a pool (or resize one); it takes traffic once a route names it")
    async def add_pool(body: PoolIn) -> dict[str, Any]:
        pool = PoolSpec(id=body.id, replicas=body.replicas, engine=engine_spec(config, body.tp, body.knobs))
        try:
            validate_pool(pool, capacity)
        except StateError as exc:
            raise ApiError(400, str(exc)) from None
        return {"id": pool.id, "version": await control.add_pool(pool)}

    @app.delete("/admin/pools/{pool_id}", response_model=Written, status_code=202, tags=["pools"],
                summary="Take a pool out of every route, drain it, delete it")
    async def remove_pool(pool_id: str) -> dict[str, Any]:
        status = await control.raw_status()
        if pool_id not in status["pools"]:
            raise ApiError(404, f"unknown pool {pool_id!r}", param="pool_id")
        return {"id": pool_id, "version": await control.remove_pool(pool_id), "draining": True}

    @app.put("/admin/routes/{class_name}", response_model=Written, tags=["routes"],
             summary="Set a class's weights over pools")
    async def set_route(class_name: str, body: RouteIn) -> dict[str, Any]:
        known_class(class_name)
        pools = (await control.raw_status())["pools"]
        unknown = sorted(set(body.weights) - set(pools))
        if unknown:
            raise ApiError(400, f"route {class_name!r} names unknown pools {unknown}", param="weights")
        total = sum(body.weights.values())
        if not body.weights or any(not (math.isfinite(w) and 0 <= w <= 1) for w in body.weights.values()) \
                or abs(total - 1) > 1e-6:
            raise ApiError(400, f"route {class_name!r}: weights must be in [0, 1] and sum to 1, not "
                           f"{dict(body.weights)}", param="weights")
        version = await control.set_route(class_name, body.weights)
        return {"route": class_name, "weights": body.weights, "version": version}

    @app.post("/admin/routes/{class_name}/rollback", response_model=PromotionOut, status_code=202, tags=["routes"],
              summary="Roll the class back: abort its promotion, or bring back the pool the last one replaced")
    async def rollback(class_name: str) -> dict[str, Any]:
        known_class(class_name)
        return await control.rollback_class(class_name)

    # --- drift -------------------------------------------------------------------------------------------------

    @app.put("/admin/drift/{class_name}", response_model=DriftOut, tags=["drift"],
             summary="The drift monitor's verdict on a class (sent by tpgate drift every interval)")
    async def report_drift(class_name: str, body: DriftIn) -> dict[str, Any]:
        known_class(class_name)
        for name in ("distances", "live", "reference"):
            if not _all_finite(getattr(body, name)):
                raise ApiError(400, f"{name}: numbers must be finite (JSON has no NaN or Infinity)", param=name)
        return await control.report_drift(class_name, body.model_dump())

    @app.get("/admin/drift", response_model=dict[str, DriftOut], tags=["drift"],
             summary="Every class's latest drift verdict")
    async def list_drift() -> dict[str, Any]:
        return dict((await control.raw_status()).get("drift", {}))

    # --- tuning ------------------------------------------------------------------------------------------------

    @app.post("/admin/tuning", response_model=StudyOut, status_code=202, tags=["tuning"],
              summary="Start an online study of a class on the GPUs production leaves free")
    async def start_study(body: StudyRequest = Body(...)) -> dict[str, Any]:  # noqa: B008
        known_class(body.class_name)
        return await tuning.start_study(body.model_dump(by_alias=True))

    @app.get("/admin/tuning", response_model=list[StudyOut], tags=["tuning"], summary="Every study")
    async def list_studies() -> list[dict[str, Any]]:
        return await tuning.studies()

    @app.get("/admin/tuning/{study_id}", response_model=StudyDetail, tags=["tuning"],
             summary="A study: progress, trials, best so far")
    async def get_study(study_id: str) -> dict[str, Any]:
        return await tuning.study(study_id)

    @app.post("/admin/tuning/{study_id}/stop", response_model=StudyOut, tags=["tuning"], summary="Stop a study")
    async def stop_study(study_id: str) -> dict[str, Any]:
        return await tuning.stop_study(study_id)

    @app.get("/admin/tuning/{study_id}/report", response_class=HTMLResponse, tags=["tuning"],
             summary="The study's HTML report (self-contained)")
    async def study_report(study_id: str) -> HTMLResponse:
        return HTMLResponse(await tuning.report_html(study_id))

    @app.post("/admin/tuning/{study_id}/promote", response_model=PromotionOut, status_code=202, tags=["tuning"],
              summary="Promote the study's winner: a staged, SLO-guarded traffic shift to a new pool")
    async def promote(study_id: str, body: PromoteIn | None = None) -> dict[str, Any]:
        return await tuning.promote(study_id, trial=None if body is None else body.trial)

    # --- promotions --------------------------------------------------------------------------------------------

    @app.get("/admin/promotions", response_model=list[PromotionOut], tags=["promotions"],
             summary="Every promotion remembered")
    async def list_promotions() -> list[dict[str, Any]]:
        return await control.promotions()

    @app.post("/admin/promotions", response_model=PromotionOut, status_code=202, tags=["promotions"],
              summary="Promote a configuration of your choice (a new pool) to a class, staged and judged")
    async def promote_configuration(body: PromotionIn) -> dict[str, Any]:
        known_class(body.class_name)
        pool_id = body.id or f"{body.class_name}-tp{body.tp}x{body.replicas}-{uuid.uuid4().hex[:4]}".lower()
        pool = PoolSpec(id=pool_id, replicas=body.replicas, engine=engine_spec(config, body.tp, body.knobs))
        try:
            validate_pool(pool, capacity)
        except StateError as exc:
            raise ApiError(400, str(exc)) from None
        return await control.start_promotion(body.class_name, pool, source="api")

    @app.get("/admin/promotions/{promotion_id}", response_model=PromotionOut, tags=["promotions"],
             summary="A promotion: phase, step, weights, each step's verdict")
    async def get_promotion(promotion_id: str) -> dict[str, Any]:
        return await control.promotion(promotion_id)

    @app.post("/admin/promotions/{promotion_id}/abort", response_model=PromotionOut, tags=["promotions"],
              summary="Abort a promotion: the old weights at once, the new pool drained and removed")
    async def abort(promotion_id: str) -> dict[str, Any]:
        return await control.abort_promotion(promotion_id, "aborted by the operator")

    return app


def gateway_state(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The controller's status as the admin API shows it (production and trial routes apart, trial pools marked,
    the studies as a list)."""
    trial_classes = raw.get("trial_classes", {})
    return {
        **raw,
        "pools": {pool_id: {**pool, "trial": pool_id.startswith(TRIAL_POOL_PREFIX)}
                  for pool_id, pool in raw["pools"].items()},
        "routes": {name: weights for name, weights in raw["routes"].items() if not is_trial_route(name)},
        "trial_routes": {name: {"class": trial_classes.get(name), "weights": weights}
                         for name, weights in raw["routes"].items() if is_trial_route(name)},
        "promotions": list(raw.get("promotions", [])),
        "studies": list((raw.get("studies") or {}).values()),
    }


def _all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value`` (Python's JSON parser reads them; the state could not be sent)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI shape, with the status its kind calls for."""

    def reply(status: int, message: str, *, param: str | None = None, code: str | None = None,
              headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(ApiError(status, message, param=param, code=code).body(), status_code=status,
                            headers=dict(headers or {}))

    mapped: tuple[tuple[type[Exception], int], ...] = (
        (UnknownStudy, 404), (NotFound, 404), (StudyRejected, 400), (StudyConflict, 409), (Conflict, 409),
        (StateRejected, 409), (PoolFailed, 502), (ControllerUnavailable, 503), (ServiceUnavailable, 503),
    )
    for error_type, status in mapped:
        def handle(request: Request, exc: Exception, status: int = status) -> JSONResponse:
            return reply(status, str(exc))

        app.add_exception_handler(error_type, handle)

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return reply(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return reply(400, "; ".join(problems) or "invalid request")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = (f"no route for {request.method} {request.url.path}" if exc.status_code == 404
                   else f"method {request.method} is not allowed on {request.url.path}" if exc.status_code == 405
                   else str(exc.detail))
        return JSONResponse(error_body(message, type=ApiError(exc.status_code, message).type),
                            status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
