"""The admin API's request and response bodies (pydantic; they make its OpenAPI schema).

Times are Unix seconds (``*_unix_s``, ``*_s`` in records) or durations in seconds; weights are shares of a class's
traffic in [0, 1]; GPUs are counts. Records the control plane keeps as JSON (promotions, studies) are passed
through with their own fields, documented on the models below.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.planner import EngineKnobs


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every refusal, in the OpenAI error shape; ``message`` is the reason."""

    error: ErrorDetail


class GpuUse(BaseModel):
    budget: int
    used: int
    free: int


class PoolOut(_Out):
    """A pool: desired and ready replicas, TP, GPUs, engine and knobs, phase."""

    id: str
    tp: int
    replicas: int = Field(description="desired replicas")
    ready_replicas: int
    gpus: int
    phase: str = Field(description="deploying | running | deploy_failed | unhealthy | ...")
    message: str = ""
    engine: dict[str, Any] = Field(description="engine kind, model, GPU type, TP, knobs, time scale")
    endpoints: dict[str, str] = Field(default_factory=dict, description="replica id -> engine URL")
    trial: bool = Field(description="a tuning study's trial pool")


class PoolIn(_In):
    """A pool to deploy (or resize): ``replicas`` engines of ``tp`` GPUs each, with engine knobs."""

    id: str = Field(description="1-48 lowercase letters, digits or '-'")
    tp: int = Field(ge=1)
    replicas: int = Field(default=1, ge=1)
    knobs: EngineKnobs = Field(default_factory=EngineKnobs)


class PromotionIn(_In):
    """Promote a configuration of your choice: ``class`` moves to a new pool of ``tp`` x ``replicas`` with
    ``knobs``, in the configured steps, judged at each."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_name: str = Field(alias="class")
    id: str | None = Field(default=None, description="the new pool's id (default: <class>-tp<N>x<R>-<4 hex>)")
    tp: int = Field(ge=1)
    replicas: int = Field(default=1, ge=1)
    knobs: EngineKnobs = Field(default_factory=EngineKnobs)


class RouteIn(_In):
    """A class's route: pool id -> share of the class's traffic (the shares sum to 1)."""

    weights: dict[str, float]


class Written(_Out):
    """A change the controller accepted, and the state version it made."""

    version: int


class PromotionOut(_Out):
    """A promotion: ``phase`` starting | shifting | finishing | succeeded | rolled_back; ``step`` indexes
    ``policy.steps`` (-1 before the first), ``weight`` is the new pool's share now; ``history`` has each judged
    step with its figures; ``reason`` says why it rolled back."""

    id: str
    phase: str
    step: int
    weight: float
    reason: str | None = None
    candidate: dict[str, Any]
    old_weights: dict[str, float]
    history: list[dict[str, Any]]
    last_verdict: dict[str, Any] | None = None


class StudyOut(_Out):
    """A study's reference: ``state`` running | completed | stopped | failed | interrupted, the GPUs it may use,
    its Optuna study and storage, measured trials, the best so far and the promotion it led to."""

    id: str
    state: str
    trials: int
    measured_trials: int
    gpus: int
    study_name: str
    storage: str
    best: dict[str, Any] | None = None
    promotion: str | None = None
    reason: str | None = None


class StudyDetail(StudyOut):
    """A study with its progress lines and every finished trial (configuration, outcome, objectives, figures)."""

    progress: list[str]
    trials_done: int
    trial_records: list[dict[str, Any]]


class PromoteIn(_In):
    """Which trial to promote (default: the study's winner)."""

    trial: int | None = Field(default=None, ge=0)


class RetuneEnded(_In):
    """How the class's latest re-tune ended (``promoted``, ``kept``, ``rolled_back`` or ``failed``) and why."""

    result: Literal["promoted", "kept", "rolled_back", "failed"]
    reason: str = Field(max_length=4000)
    study: str | None = Field(default=None, max_length=200)
    promotion: str | None = Field(default=None, max_length=200)
    ended_unix_s: float = Field(allow_inf_nan=False)


class DriftIn(_In):
    """The drift monitor's verdict on a class after an interval: ``tpgate drift`` sends one per class and interval,
    the whole verdict each time. ``distances``: each distance's latest live figure over the reference's
    (``slo_attainment``: the attainment itself); ``live``: the interval's live profile; ``reference``: what the
    class was tuned or promoted for; ``decision``: what the guard rails say now; ``valid_for_s``: after this long
    without a new report the verdict is stale (the monitor stopped) and no longer counts as drifted."""

    drifted: bool
    reason: str = Field(max_length=4000)
    distances: dict[str, float] = Field(default_factory=dict)
    live: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    decision: Literal["retune", "advise", "hold"]
    decision_reason: str = Field(max_length=4000)
    retune: RetuneEnded | None = None
    valid_for_s: float = Field(gt=0, le=86_400)


class DriftOut(_Out):
    """A class's latest drift verdict as the gateway keeps it, with its age and whether it is ``stale``."""

    drifted: bool
    reason: str
    decision: str
    age_s: float
    stale: bool


class GatewayState(_Out):
    """The whole picture: pools, routes with weights, GPU budget, promotions and studies, recent events."""

    version: int
    model: str
    gpus: GpuUse
    pools: dict[str, PoolOut]
    draining: dict[str, dict[str, Any]]
    routes: dict[str, dict[str, float]] = Field(description="class -> pool -> weight (production routes)")
    trial_routes: dict[str, dict[str, Any]] = Field(description="trial route -> its class and weights")
    promotions: list[PromotionOut]
    studies: list[StudyOut]
    drift: dict[str, DriftOut] = Field(default_factory=dict,
                                       description="class -> the drift monitor's latest verdict (tpgate drift)")
    events: list[dict[str, Any]]
