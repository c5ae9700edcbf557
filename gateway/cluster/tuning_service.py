"""The tuning service: online studies, inside the cluster, one service per gateway (a named Ray actor, so that any
router replica's admin API reaches the same studies).

A study runs the tuner's study engine (:func:`tuner.tune`, imported only when a study starts) against the running
gateway: its trials are pools on trial routes, on the GPUs the production pools leave free, up to
``tuning.max_gpus`` and less what other running studies hold. Trial traffic carries the admin token and names its
trial route; production routes never name a trial pool. Where no GPU is left, or the class is being tuned
already, the study is refused with the numbers (:class:`StudyConflict`). A study tunes with the class's
configured load profile, or with one it brings (``profile``: for example the traffic the class sees now), which
is validated as ``tpgate load`` validates one and kept next to the state file; and configurations to measure
first (``first``: a drift re-tune measures the class's current one under the same load).

Every study has a reference in the controller's store (the ``studies`` record section: class, Optuna study and
storage, state, best so far, the promotion it led to), kept up to date as trials finish; a service that starts
and finds a study still marked running (the gateway stopped under it) marks it ``interrupted`` — its trials stay
in the Optuna storage. A finished study's winner is promoted with :meth:`TuningService.promote`, which starts the
controller's staged promotion of the class to a new pool of that configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import TpgateConfig, TuningConfig
from gateway.control.client import ControlClient, GatewayStatus
from gateway.control.initial_state import engine_spec
from gateway.control.state import POOL_ID_PATTERN, PoolSpec, is_trial_route
from gateway.errors import UserError
from gateway.planner import EngineKnobs
from gateway.validation import field_problems

logger = logging.getLogger("tpgate.tuning")

TUNING_SERVICE_NAME = "tpgate-tuning"
RECORD_SECTION = "studies"
TRIAL_POOL_PREFIX = "t-"  # the tuner's trial pools (tuner.runner.trial_pool_id)
PROGRESS_LINES = 40
STOP_TIMEOUT_S = 30.0
KEEP_STUDIES = 50
_COUNTED = re.compile(r"^#\d+ \[(\d+)/")  # a trial line that counted: "#4 [3/6] ..."


class StudyConflict(Exception):
    """The study cannot run now (no GPU free, the class is being tuned, nothing to promote); 409."""


class StudyRejected(Exception):
    """The request is invalid (an unknown class, a bad override); 400."""


class UnknownStudy(Exception):
    """No study has that id; 404."""


class StudyRequest(BaseModel):
    """A study to run: the class and what it overrides of ``tuning:`` in the configuration."""

    model_config = ConfigDict(extra="forbid")

    class_name: str = Field(alias="class", description="the workload class to tune")
    trials: int = Field(default=6, ge=1, le=500, description="measured trials")
    timeout_s: float | None = Field(default=None, gt=0, description="stop starting trials after this (wall seconds)")
    seed: int | None = None
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    max_gpus: int | None = Field(default=None, ge=1, description="at most this many GPUs (default: tuning.max_gpus)")
    warmup_s: float | None = Field(default=None, ge=0)
    window_s: float | None = Field(default=None, gt=0)
    trial_timeout_s: float | None = Field(default=None, gt=0)
    guided_trials: int | None = Field(default=None, ge=0)
    knobs: dict[str, list[Any]] | None = Field(default=None, description="tuning.knobs values to try, by knob")
    profile: dict[str, Any] | None = Field(
        default=None, description="the load to tune with instead of the class's configured profile (the fields of "
                                  "a `tpgate load` profile, in the engine's clock): for example the class's traffic "
                                  "as observed")
    first: list[dict[str, Any]] | None = Field(
        default=None, max_length=16,
        description="configurations (tp, replicas, knobs) measured before the model's picks: a re-tune measures the "
                    "class's current configuration under the same load, then earlier studies' winners")

    def tuning(self, base: TuningConfig) -> TuningConfig:
        """``base`` with this request's overrides; StudyRejected naming a bad value."""
        overrides = {name: getattr(self, name) for name in ("max_gpus", "warmup_s", "window_s", "trial_timeout_s",
                                                            "guided_trials") if getattr(self, name) is not None}
        data = base.model_dump()
        data.update(overrides)
        if self.knobs is not None:
            data["knobs"] = {**data["knobs"], **self.knobs}
        try:
            return TuningConfig.model_validate(data)
        except ValidationError as exc:
            raise StudyRejected("; ".join(str(p) for p in field_problems(exc))) from None


def allotment(status: GatewayStatus, *, held_by_studies: int, max_gpus: int | None) -> tuple[int, str]:
    """GPUs a new study may use, and how that was counted (for a refusal): the budget, less the production
    pools (every pool that is not a trial pool), less what running studies hold, capped by ``max_gpus``."""
    production = {pool_id: pool for pool_id, pool in status.pools.items()
                  if not pool_id.startswith(TRIAL_POOL_PREFIX)}
    used = sum(pool.gpus for pool in production.values())
    free = status.gpus_budget - used - held_by_studies
    allotted = free if max_gpus is None else min(free, max_gpus)
    detail = ", ".join(f"{pool_id} {pool.replicas} x tp{pool.tp}" for pool_id, pool in sorted(production.items()))
    counted = (f"the budget is {status.gpus_budget} GPUs, production pools use {used} ({detail or 'none'}), running "
               f"studies hold {held_by_studies}" + (f", tuning.max_gpus is {max_gpus}" if max_gpus is not None else "")
               + f": {max(allotted, 0)} for a study")
    return max(allotted, 0), counted


@dataclass
class _Study:
    """A study this service knows: its reference (persisted) and, while it runs, its task and progress lines."""

    reference: dict[str, Any]
    task: asyncio.Task[Any] | None = None
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=PROGRESS_LINES))

    @property
    def id(self) -> str:
        return str(self.reference["id"])

    @property
    def running(self) -> bool:
        return self.reference["state"] == "running"


StudyEngine = Callable[..., Any]
"""``tuner.tune`` or a stand-in: ``await engine(config, class_name, gateway=..., storage=..., study_name=...,
n_trials=..., timeout_s=..., seed=..., sampler=..., progress=...)`` returning a ``StudyResult``."""


class TuningService:
    """Online studies of one gateway (see the module's docstring). Built as a named Ray actor by the builders."""

    def __init__(
        self,
        config: TpgateConfig,
        *,
        control: Any = None,
        admin_token: str | None = None,
        storage: str | None = None,
        engine: StudyEngine | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``control``: a ControlClient (default: the gateway's controller by name); ``admin_token``: what trial
        traffic carries (default: read from ``auth.admin_token_file``); ``storage``: the Optuna storage URL
        (default: ``tune.db`` next to the state file); ``engine``: the study engine (default: ``tuner.tune``)."""
        from gateway.control.controller import CONTROLLER_NAME, NAMESPACE

        self._config = config
        self._control = control or ControlClient(name=CONTROLLER_NAME, namespace=NAMESPACE)
        self._admin_token = admin_token
        self._storage = storage
        self._engine = engine
        self._wall_clock = wall_clock
        self._studies: dict[str, _Study] = {}
        self._loaded = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- studies ---------------------------------------------------------------------------------------------

    async def start_study(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Start a study (``request``: :class:`StudyRequest` fields, ``class`` named so); its reference."""
        try:
            wanted = StudyRequest.model_validate(request)
        except ValidationError as exc:
            raise StudyRejected("; ".join(str(p) for p in field_problems(exc))) from None
        class_name = wanted.class_name
        if class_name not in self._config.classes:
            raise StudyRejected(f"unknown class {class_name!r} (classes: {', '.join(self._config.classes)})")
        profile_yaml = None if wanted.profile is None else _profile_yaml(wanted.profile)
        if profile_yaml is None and self._config.classes[class_name].profile is None:
            raise StudyRejected(f"class {class_name!r} has no load profile to tune with (classes.{class_name}.profile)")
        async with self._lock:
            await self._load()
            running = next((s for s in self._studies.values() if s.running
                            and s.reference["class"] == class_name), None)
            if running is not None:
                done = f"{self._trials_done(running)}/{running.reference['trials']}"
                raise StudyConflict(f"class {class_name!r} is being tuned by study {running.id} ({done} trials); "
                                    "stop it first")
            tuning = wanted.tuning(self._config.tuning)
            held = sum(int(s.reference["gpus"]) for s in self._studies.values() if s.running)
            status = await self._control.status()
            gpus, counted = allotment(status, held_by_studies=held, max_gpus=tuning.max_gpus)
            if gpus < 1:
                raise StudyConflict(f"no GPU free for a study of class {class_name!r}: {counted}")
            config = self._config.model_copy(update={"tuning": tuning.model_copy(update={"max_gpus": gpus})})
            study_id = f"{class_name}-{uuid.uuid4().hex[:6]}"
            profile_path = None
            if profile_yaml is not None:  # the study's own profile, kept next to the state file
                profile_path = Path(self._config.state_file).expanduser().resolve().with_name(
                    f"study-{study_id}-profile.yaml")
                await asyncio.to_thread(_write_text, profile_path, profile_yaml)
                classes = dict(config.classes)
                classes[class_name] = classes[class_name].model_copy(update={"profile": str(profile_path)})
                config = config.model_copy(update={"classes": classes})
            try:
                from tuner import build_space

                space = build_space(config, class_name, gpus_free=gpus)
            except UserError as exc:
                raise StudyConflict(f"{exc} ({counted})") from None
            await asyncio.to_thread(_prepare_storage, self.storage)
            reference: dict[str, Any] = {
                "id": study_id, "class": class_name, "study_name": f"online-{study_id}", "storage": self.storage,
                "state": "running", "trials": wanted.trials, "gpus": space.gpus, "tp_sizes": list(space.tp_sizes),
                "started_unix_s": self._wall_clock(), "ended_unix_s": None, "reason": None, "measured_trials": 0,
                "best": None, "promotion": None, "profile": None if profile_path is None else str(profile_path),
            }
            study = _Study(reference)
            self._studies[study_id] = study
            study.task = asyncio.get_running_loop().create_task(self._run(study, config, wanted))
            await self._save()
            return dict(reference)

    async def studies(self) -> list[dict[str, Any]]:
        await self._load()
        return [dict(s.reference) for s in self._studies.values()]

    async def study(self, study_id: str) -> dict[str, Any]:
        """The reference, the recent progress lines, and every finished trial read from the study's storage."""
        study = await self._get(study_id)
        trials, best = await asyncio.to_thread(_read_trials, study.reference, self._config)
        return {**study.reference, "progress": list(study.lines), "trials_done": len(trials), "trial_records": trials,
                "best": best or study.reference.get("best")}

    async def stop_study(self, study_id: str) -> dict[str, Any]:
        """Stop a running study: the trial in flight is cancelled (its pool and route removed), the storage kept."""
        study = await self._get(study_id)
        if study.running and study.task is not None:
            study.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(study.task), STOP_TIMEOUT_S)
        return dict(study.reference)

    async def report_html(self, study_id: str) -> str:
        """The study's HTML report (self-contained)."""
        study = await self._get(study_id)
        from tuner.report import load_report, render_report

        try:
            return await asyncio.to_thread(lambda: render_report(load_report(study.reference["storage"],
                                                                             study.reference["study_name"])))
        except UserError as exc:
            raise StudyConflict(f"study {study_id} has no report yet: {exc}") from None

    async def promote(self, study_id: str, *, trial: int | None = None) -> dict[str, Any]:
        """Promote the study's winner (or the feasible ``trial``) to its class: a new pool of that configuration,
        which the controller brings up and shifts the class's traffic to in steps. Returns the promotion."""
        study = await self._get(study_id)
        if study.running:
            raise StudyConflict(f"study {study_id} is still running ({self._trials_done(study)}/"
                                f"{study.reference['trials']} trials); stop it or wait for it")
        trials, best = await asyncio.to_thread(_read_trials, study.reference, self._config)
        chosen = best if trial is None else next((t for t in trials if t["number"] == trial), None)
        if chosen is None:
            raise StudyConflict(f"study {study_id} has no feasible configuration to promote" if trial is None
                                else f"study {study_id} has no trial #{trial}")
        if chosen["outcome"] != "feasible":
            raise StudyConflict(f"trial #{chosen['number']} of study {study_id} is {chosen['outcome']}, not feasible "
                                f"({chosen['reason']})")
        class_name = study.reference["class"]
        params = chosen["params"]
        knobs = EngineKnobs.of({k: v for k, v in params.items() if k not in ("tp", "replicas")})
        pool = PoolSpec(id=_pool_id(class_name, params, study_id), replicas=int(params["replicas"]),
                        engine=engine_spec(self._config, int(params["tp"]), knobs))
        promotion = await self._control.start_promotion(class_name, pool, source=f"study {study_id} trial "
                                                        f"#{chosen['number']} ({chosen['label']})")
        study.reference["promotion"] = promotion["id"]
        await self._save()
        return promotion

    async def shutdown(self) -> None:
        """Stop every running study (the gateway is stopping)."""
        for study in list(self._studies.values()):
            if study.running:
                await self.stop_study(study.id)

    @property
    def storage(self) -> str:
        if self._storage is None:
            path = Path(self._config.state_file).expanduser().resolve().with_name("tune.db")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._storage = f"sqlite:///{path}"
        return self._storage

    # --- internals -------------------------------------------------------------------------------------------

    async def _run(self, study: _Study, config: TpgateConfig, request: StudyRequest) -> None:
        reference = study.reference

        def progress(line: str) -> None:
            study.lines.append(line)
            counted = _COUNTED.match(line)
            if counted is not None:
                reference["measured_trials"] = int(counted.group(1))
                self._spawn(self._save())

        try:
            from tuner import Candidate, GatewayHandle, tune

            engine = self._engine or tune
            gateway = GatewayHandle(control=self._control, admin_token=self._token())
            # only when asked: a stand-in engine need not know the parameter
            extra: dict[str, Any] = {"first": [Candidate.from_params(p) for p in request.first]} if request.first \
                else {}
            result = await engine(config, reference["class"], gateway=gateway, storage=reference["storage"],
                                  study_name=reference["study_name"], n_trials=request.trials,
                                  timeout_s=request.timeout_s, seed=request.seed, sampler=request.sampler,
                                  progress=progress, **extra)
            reference["state"] = "completed"
            reference["reason"] = f"stopped by {result.stopped_by}"
            reference["measured_trials"] = result.measured_trials
            if result.best:
                reference["best"] = _describe_record(result.best[0])
        except asyncio.CancelledError:
            reference["state"] = "stopped"
            reference["reason"] = "stopped by the operator"
        except Exception as exc:  # the study failed (the gateway went away, a bug): said in its reference
            logger.exception("study %s failed", study.id)
            reference["state"] = "failed"
            reference["reason"] = f"{type(exc).__name__}: {exc}"
        finally:
            reference["ended_unix_s"] = self._wall_clock()
            await self._save()

    def _token(self) -> str:
        if self._admin_token is None:
            from gateway.cluster.runtime import read_admin_token

            self._admin_token = read_admin_token(Path(self._config.auth.admin_token_file).expanduser())
        return self._admin_token

    async def _get(self, study_id: str) -> _Study:
        await self._load()
        study = self._studies.get(study_id)
        if study is None:
            raise UnknownStudy(f"no study {study_id!r}")
        return study

    async def _load(self) -> None:
        """Once: the references in the store; a study still marked running was interrupted."""
        if self._loaded:
            return
        stored = await self._control.records(RECORD_SECTION) or {}
        changed = False
        for reference in stored.values():
            if reference.get("state") == "running":
                reference.update(state="interrupted", reason="the gateway stopped while it ran; its trials are kept "
                                 "in the storage")
                changed = True
            self._studies[str(reference["id"])] = _Study(dict(reference))
        self._loaded = True
        if changed:
            await self._save()

    async def _save(self) -> None:
        finished = [s for s in self._studies.values() if not s.running]
        for old in finished[:max(0, len(finished) - KEEP_STUDIES)]:
            del self._studies[old.id]
        await self._control.put_records(RECORD_SECTION, {s.id: dict(s.reference) for s in self._studies.values()})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _trials_done(self, study: _Study) -> int:
        return int(study.reference.get("measured_trials") or 0)


def _pool_id(class_name: str, params: Mapping[str, Any], study_id: str) -> str:
    """``batch-tp2x2-3fa2``: the class, the shape, and a digest of the study and the knobs (unique enough)."""
    digest = hashlib.sha256(f"{study_id}{sorted(params.items())}".encode()).hexdigest()[:4]
    pool_id = f"{class_name}-tp{params['tp']}x{params['replicas']}-{digest}".lower().replace("_", "-")
    if is_trial_route(pool_id) or pool_id.startswith(TRIAL_POOL_PREFIX) or not POOL_ID_PATTERN.match(pool_id):
        pool_id = f"p-{digest}-tp{params['tp']}x{params['replicas']}"
    return pool_id


def _describe_record(record: Any) -> dict[str, Any]:
    """A trial record as the admin API shows it (number, configuration, outcome, objectives, key figures)."""
    measured = record.measured.as_dict() if record.measured is not None else {}
    figures = {name: measured.get(name) for name in ("requests_per_s", "output_tokens_per_s", "ttft_p99_s",
                                                      "tpot_p99_s", "e2e_p99_s", "error_rate")}
    return {"number": record.number, "label": record.candidate.label(), "params": record.candidate.params(),
            "gpus": record.candidate.gpus, "outcome": record.outcome, "reason": record.reason,
            "objectives": None if record.objectives is None else list(record.objectives), "measured": figures,
            "guided": record.guided}


def _profile_yaml(fields: Mapping[str, Any]) -> str:
    """A study's own load profile as YAML, validated as ``tpgate load`` validates one; StudyRejected naming the
    bad field."""
    import yaml

    from loadtests import LoadTestInputError
    from loadtests.profile import validate_profile

    data = {"name": "study", **fields}
    try:
        validate_profile(data, source="profile")
    except LoadTestInputError as exc:
        raise StudyRejected(str(exc)) from None
    return str(yaml.safe_dump(data, sort_keys=False))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _prepare_storage(url: str) -> None:
    """Create the storage's tables now, once: a study starting and a reader polling it must not both try."""
    import optuna

    optuna.storages.RDBStorage(url)


def _read_trials(reference: Mapping[str, Any], config: TpgateConfig) -> tuple[list[dict[str, Any]],
                                                                             dict[str, Any] | None]:
    """Every finished trial of the study in its storage, and the best so far (blocking: run in a thread)."""
    import optuna
    from optuna.trial import TrialState

    from tuner.objectives import objective_specs
    from tuner.records import RECORD_ATTR, TrialRecord, best_records

    try:
        study = optuna.load_study(study_name=reference["study_name"], storage=reference["storage"])
    except KeyError:  # not created yet (the study is starting)
        return [], None
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    records = [TrialRecord.from_attrs(t.user_attrs) for t in finished if RECORD_ATTR in t.user_attrs]
    best = best_records(records, objective_specs(config.classes[reference["class"]].objectives))
    return [_describe_record(r) for r in records], (_describe_record(best[0]) if best else None)
