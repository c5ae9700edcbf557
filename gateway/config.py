"""The one typed configuration object, loaded once per process from a YAML file, then ``TPGATE_*``
environment overrides, then command-line flags, and passed down.

Layering is pydantic-settings': environment overrides name a field path with double underscores
(``TPGATE_GPUS=4``, ``TPGATE_SERVER__PORT=9000``); scalars are converted by the field's type (``4`` an int,
``true`` a bool) and mappings or lists are given as JSON (``TPGATE_ENGINE__EXTRA_ARGS='["--log-level", "INFO"]'``).
Only variables that name a field are read (``TPGATE_API_KEY`` belongs to ``tpgate load``); a bad value there is
an error. The YAML file is read by :func:`gateway.yamlfile.read_yaml_mapping`, whose errors name the file.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from gateway.errors import UserError
from gateway.planner import EngineKnobs, GpuSpec, gpu_catalog
from gateway.planner.knobs import QuantPolicy
from gateway.validation import FieldProblem, field_problems
from gateway.yamlfile import YamlFileError, read_yaml_mapping

ENV_PREFIX = "TPGATE_"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuTypeConfig(StrictModel):
    """A GPU type added by the user (same fields as the built-in catalog)."""

    memory_mib: int = Field(gt=0)
    bf16_tflops: float = Field(gt=0)
    hbm_gb_per_s: float = Field(gt=0)
    interconnect: str = Field(pattern="^(nvlink|pcie)$")
    interconnect_gb_per_s: float = Field(gt=0)
    default_max_batch_size: int = Field(default=128, gt=0)


LOOPBACK_ENGINE_HOST = "127.0.0.1"  # engines on one node listen here and need no key


class EngineConfig(StrictModel):
    """How pools run their engines."""

    kind: Literal["sim", "lmdeploy"] = "sim"
    model_path: str | None = Field(default=None, description="lmdeploy: weights directory or hub id (default: model)")
    host: str = Field(
        default=LOOPBACK_ENGINE_HOST, min_length=1, pattern=r"^\S+$",
        description="where engines listen: 127.0.0.1 (one node), 'auto' (each node's own address, as Ray knows it) "
                    "or an address; any host but 127.0.0.1 makes every pool's engines require a key of their own "
                    "(LMDeploy's --api-keys) that only the routers hold")
    time_scale: float = Field(default=1.0, gt=0, description="sim: run the simulated clock this many times faster")
    deviation_file: str | None = Field(default=None, description="sim: departures from the analytical model")
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout_s: float = Field(default=120.0, gt=0)
    health_check_period_s: float = Field(default=2.0, gt=0)
    stop_timeout_s: float = Field(default=10.0, gt=0)


class PoolConfig(StrictModel):
    tp: int = Field(ge=1)
    replicas: int = Field(default=1, ge=1)
    knobs: EngineKnobs = Field(default_factory=EngineKnobs)


class SloConfig(StrictModel):
    """Latency and error targets of a workload class (constraints for the tuner, triggers for rollback)."""

    ttft_p99_s: float | None = Field(default=None, gt=0)
    tpot_p99_s: float | None = Field(default=None, gt=0)
    e2e_p99_s: float | None = Field(default=None, gt=0)
    error_rate_max: float | None = Field(default=None, ge=0, le=1)


Objective = Literal["min_e2e_p99", "max_output_tokens_per_s", "max_goodput"]


class WorkloadClassConfig(StrictModel):
    description: str = ""
    objective: Objective | list[Objective] = Field(
        default="min_e2e_p99",
        description="what the tuner optimises; a list makes the study multi-objective (a Pareto front)",
    )
    slo: SloConfig = Field(default_factory=SloConfig)
    profile: str | None = Field(default=None, description="load profile that defines the class (loadtests/profiles)")
    gpu_budget: int | None = Field(default=None, ge=1, description="GPUs the class may use (default: an even share)")

    @field_validator("objective")
    @classmethod
    def _distinct_objectives(cls, objective: Objective | list[Objective]) -> Objective | list[Objective]:
        if isinstance(objective, list) and (not objective or len(set(objective)) != len(objective)):
            raise ValueError(f"must name one objective or a list of distinct ones, not {objective!r}")
        return objective

    @property
    def objectives(self) -> tuple[Objective, ...]:
        """The objectives in order (one for a single-objective class)."""
        return (self.objective,) if isinstance(self.objective, str) else tuple(self.objective)


QUANT_POLICY_FP16: QuantPolicy = 0


class TuningKnobsConfig(StrictModel):
    """The engine-knob values a study tries (each a list of choices; one choice fixes the knob)."""

    max_batch_size: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [128, 256, 512, 1024],
                                                              min_length=1)
    cache_max_entry_count: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.7, 0.8, 0.9], min_length=1)
    quant_policy: list[QuantPolicy] = Field(default_factory=lambda: [QUANT_POLICY_FP16], min_length=1)
    max_prefill_token_num: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [4096, 8192],
                                                                     min_length=1)

    @model_validator(mode="after")
    def _distinct_values(self) -> TuningKnobsConfig:
        for name in type(self).model_fields:
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"knobs.{name} lists a value twice: {values}")
        return self


class TuningConfig(StrictModel):
    """How ``tpgate tune`` searches and measures. Warm-up and window are wall-clock seconds."""

    knobs: TuningKnobsConfig = Field(default_factory=TuningKnobsConfig)
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int | None = Field(default=None, ge=1, description="default: as many as the GPU budget holds")
    max_gpus: int | None = Field(default=None, ge=1,
                                 description="online tuning: at most this many of the GPUs production leaves free")
    warmup_s: float = Field(default=10.0, ge=0, description="load before the measured window (wall seconds)")
    window_s: float = Field(default=20.0, gt=0, description="the measured window (wall seconds)")
    trial_timeout_s: float = Field(default=600.0, gt=0, description="deploy, ready, warm-up and window together")
    guided_trials: int = Field(default=3, ge=0, description="first trials taken from the performance model's ranking")
    parallel_trials: int = Field(default=1, ge=1,
                                 description="trials measured at once, packed into the study's GPU budget")
    remeasure_runs: int = Field(default=1, ge=0, description="extra runs, each with another load seed, of a "
                                "configuration before it can win; configurations rank by their worst run")
    max_failure_probability: float = Field(default=0.5, gt=0, le=1, description="a configuration whose neighbours' "
                                           "failures give it more than this probability of failing is not deployed")
    sim_time_scale: float = Field(default=10.0, gt=0, le=1000,
                                  description="tpgate tune's own gateway runs simulated engines this much faster")
    max_clock_lag_ratio: float = Field(default=0.15, ge=0, lt=1,
                                       description="simulated engines: clock lag corrected up to this, else invalid")
    prometheus_url: str | None = Field(default=None, description="default: start a Prometheus server on loopback")

    @model_validator(mode="after")
    def _replica_range(self) -> TuningConfig:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class PromotionConfig(StrictModel):
    """How a class moves to a new pool (a tuned winner): its traffic shifts in steps, and the new pool is judged on
    its own metrics at each step; a failed check rolls back. Times are wall-clock seconds."""

    steps: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.1, 0.5, 1.0], min_length=1,
        description="the new pool's share of the class's traffic at each step, increasing, ending at 1")
    dwell_s: float = Field(default=30.0, gt=0, description="at least this long at each step before it is judged")
    min_requests: int = Field(default=20, ge=1, description="new-pool requests a step needs before it is judged")
    max_inconclusive_s: float = Field(
        default=120.0, gt=0, description="a step still short of min_requests this long after it began rolls back")
    ready_timeout_s: float = Field(default=600.0, gt=0, description="the new pool (each growth of it) ready by then")
    max_latency_ratio: float = Field(
        default=1.5, ge=1, description="the new pool's TTFT and TPOT p99 at most this times the old pool's")
    error_rate_max: float | None = Field(
        default=None, ge=0, le=1, description="default: the class's slo.error_rate_max, else 0.01")
    max_5xx: int = Field(default=5, ge=1, description="this many 5xx answers from the new pool fail a step at once")
    check_period_s: float = Field(default=2.0, gt=0, description="how often a step's window is judged")

    @field_validator("steps")
    @classmethod
    def _increasing_to_one(cls, steps: list[float]) -> list[float]:
        if any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] != 1:
            raise ValueError(f"must increase and end at 1, not {steps}")
        return steps


def _default_classes() -> dict[str, WorkloadClassConfig]:
    return {
        "interactive": WorkloadClassConfig(
            description="low latency: a few concurrent users",
            objective="min_e2e_p99",
            slo=SloConfig(ttft_p99_s=0.5, tpot_p99_s=0.040),
            profile="interactive",
        ),
        "batch": WorkloadClassConfig(
            description="high concurrency: many users, throughput first",
            objective="max_output_tokens_per_s",
            slo=SloConfig(ttft_p99_s=5.0, error_rate_max=0.001),
            profile="batch",
        ),
    }


class ServerConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    fast_path: Literal["standard", "haproxy"] = Field(
        default="haproxy",
        description="haproxy: Ray Serve's HAProxy direct ingress (4-5x less added latency), its listeners kept on "
        "loopback by gateway/cluster/haproxy_guard.py; standard: Serve's Python HTTP proxy (docs/benchmarks.md)",
    )
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        default="HeadOnly",
        description="Ray Serve's HTTP ingress on the Ray head only, or on every node that runs a Serve replica "
                    "(engines too: put a load balancer in front, and give server.host an address other nodes "
                    "do not share)")


class RouterConfig(StrictModel):
    replicas: int = Field(default=1, ge=1)
    placement: Literal["gateway_node", "any_node"] = Field(
        default="gateway_node",
        description="gateway_node: router replicas run on the node that started the gateway, beside its controller, "
                    "so losing a GPU node never takes a router (and the requests in it) along; any_node: wherever "
                    "Ray Serve puts them")
    max_inflight_per_replica: int = Field(default=512, ge=1, description="per engine replica, before queueing")
    queue_timeout_s: float = Field(default=2.0, ge=0, description="wait for a slot, then 429")
    connect_timeout_s: float = Field(default=2.0, gt=0)
    first_byte_timeout_s: float = Field(default=300.0, gt=0, description="until the response (or first event)")
    stream_idle_timeout_s: float = Field(default=120.0, gt=0, description="between two streamed events")
    request_timeout_s: float = Field(default=1800.0, gt=0, description="whole request; also the drain deadline")
    max_attempts: int = Field(default=3, ge=1, description="tries on different replicas before any byte is sent")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    body_read_timeout_s: float = Field(default=30.0, gt=0,
                                       description="the whole request body must arrive within this, else 408")
    max_json_depth: int = Field(default=64, ge=4, le=512, description="nesting of a request body's JSON, else 400")
    retry_after_s: int = Field(default=1, ge=1)
    metrics_targets_dir: str | None = Field(
        default=None, description="each router replica serves its own /metrics on a free port of server.host and "
        "writes a Prometheus file-SD target file (tpgate-router-<id>.json) here: scrape them all with file_sd_configs")
    serve_access_log: bool = Field(default=False, description="Ray Serve's per-request access-log line in the "
                                   "router replicas' logs (costs CPU on every request; tpgate's metrics count them)")


class ApiKeyConfig(StrictModel):
    """A client API key, given literally or by the name of an environment variable holding it."""

    key: SecretStr | None = None
    key_env: str | None = None
    default_class: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("an API key needs exactly one of 'key' or 'key_env'")
        return self


class AuthConfig(StrictModel):
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    admin_token_file: str = "~/.tpgate/admin-token"
    ray_token_file: str = Field(default="~/.tpgate/ray-token",
                                description="token of the Ray cluster tpgate starts (token authentication)")
    engine_key_file: str = Field(default="~/.tpgate/engine-key",
                                 description="seed of the per-pool engine keys (engines beyond 127.0.0.1 only)")


class DriftClassConfig(StrictModel):
    """When a class's live traffic no longer looks like the traffic it was tuned for, and what may follow.

    Ratios compare the live profile with the class's reference profile both ways (``concurrency_ratio: 4`` marks
    four times as many requests in flight, or a quarter as many); null turns a distance off. A distance counts
    only when it holds over ``window_s`` (in at least ``sustained_share`` of the window's intervals), so a
    burst shorter than the window never marks a class. The re-tune rails (``min_retune_interval_s``,
    ``max_gpus``, ``margin_ratio``) bound what ``auto`` may do; ``advisory`` reports the decision only.
    """

    mode: Literal["off", "advisory", "auto"] = "advisory"
    window_s: float = Field(default=600.0, gt=0, description="a shift must last this long (seconds)")
    concurrency_ratio: float | None = Field(default=4.0, gt=1, description="mean requests in flight vs reference")
    arrival_rate_ratio: float | None = Field(default=None, gt=1, description="arrivals per second vs reference")
    prompt_median_ratio: float | None = Field(default=2.0, gt=1, description="median prompt tokens vs reference")
    output_median_ratio: float | None = Field(default=2.0, gt=1, description="median output tokens vs reference")
    slo_attainment_min: float | None = Field(
        default=None, gt=0, le=1, description="share of successful requests that met every SLO, at least")
    min_requests: int = Field(default=20, ge=1,
                              description="an interval with fewer finished requests says nothing about lengths")
    sustained_share: float = Field(default=1.0, gt=0.5, le=1,
                                   description="share of the window's intervals a shift must hold in")
    min_retune_interval_s: float = Field(default=3600.0, ge=0, description="between two re-tunes of the class")
    max_gpus: int | None = Field(default=None, ge=1, description="GPUs a re-tune may use (default: all free)")
    margin_ratio: float = Field(default=0.05, ge=0, lt=1,
                                description="a re-tune's winner must beat the current pool by this much")
    retune_trials: int = Field(default=4, ge=2, le=100,
                               description="measured trials of a re-tune's study, the current configuration's included")
    retune_timeout_s: float | None = Field(default=None, gt=0,
                                           description="a re-tune's study starts no trial after this (wall seconds)")


class DriftConfig(StrictModel):
    """Drift detection per workload class (classes not listed are not watched)."""

    interval_s: float = Field(default=30.0, gt=0, description="the monitor reads the metrics this often (seconds)")
    sample_s: float = Field(default=5.0, gt=0, description="direct scrapes: read the requests in flight this often "
                            "within an interval (seconds; none in between when not shorter than interval_s)")
    classes: dict[str, DriftClassConfig] = Field(default_factory=dict)
    reference_file: str = Field(default="~/.tpgate/drift-references.json",
                                description="reference profiles when no controller holds them")


class TpgateConfig(BaseSettings):
    """Everything a tpgate process needs to know. Build it with :func:`load_config`: constructing one directly
    reads no environment (the layering is explicit there)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_prefix=ENV_PREFIX, env_nested_delimiter="__")

    model: str = "internvl2_5-38b"
    served_model_name: str | None = None
    gpu_types: dict[str, GpuTypeConfig] = Field(default_factory=dict, description="GPU types added to the catalog")
    gpu: str = "h100-80gb"
    gpus: int = Field(default=8, ge=1, description="GPU budget")
    gpus_per_node: int | None = Field(default=None, ge=1, description="defaults to the budget (one node)")
    ray_address: str | None = Field(default=None, description="join this Ray cluster instead of starting one")
    state_file: str = Field(default="~/.tpgate/state.json",
                            description="the controller's persisted state (pools, routes, history)")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    classes: dict[str, WorkloadClassConfig] = Field(default_factory=_default_classes)
    default_class: str = "interactive"
    drift: DriftConfig = Field(default_factory=DriftConfig)
    pools: dict[str, PoolConfig] = Field(default_factory=dict, description="empty: the planner picks one per class")
    routes: dict[str, dict[str, float]] = Field(default_factory=dict)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, gpu: str, info: ValidationInfo) -> str:
        known = set(gpu_catalog()) | {name.lower() for name in info.data.get("gpu_types", {})}
        if gpu.lower() not in known:
            raise ValueError(f"must be a known GPU type ({', '.join(sorted(known))}, or one under gpu_types)")
        return gpu

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TpgateConfig:
        if not self.classes:
            raise ValueError("at least one workload class is needed")
        if self.default_class not in self.classes:
            raise ValueError(f"default_class {self.default_class!r} is not a class ({', '.join(self.classes)})")
        for key in self.auth.api_keys:
            if key.default_class is not None and key.default_class not in self.classes:
                raise ValueError(f"API key default_class {key.default_class!r} is not a class")
        used = sum(p.tp * p.replicas for p in self.pools.values())
        if used > self.gpus:
            detail = " + ".join(f"{name} {p.replicas}x{p.tp}" for name, p in self.pools.items())
            raise ValueError(f"pools need {used} GPUs ({detail}), more than gpus={self.gpus}")
        if self.pools and set(self.routes) != set(self.classes):
            raise ValueError(f"with explicit pools, routes must name every class ({', '.join(self.classes)})")
        if self.routes and not self.pools:
            raise ValueError("routes need explicit pools")
        for route, weights in self.routes.items():
            unknown = set(weights) - set(self.pools)
            if unknown:
                raise ValueError(f"route {route!r} names unknown pools {sorted(unknown)}")
            if abs(sum(weights.values()) - 1) > 1e-6:
                raise ValueError(f"route {route!r}: weights sum to {sum(weights.values()):g}, not 1")
        unknown_drift = sorted(set(self.drift.classes) - set(self.classes))
        if unknown_drift:
            raise ValueError(f"drift.classes names unknown classes {unknown_drift} "
                             f"(classes: {', '.join(self.classes)})")
        for name, drift in self.drift.classes.items():
            if drift.window_s < self.drift.interval_s:
                raise ValueError(f"drift.classes.{name}.window_s ({drift.window_s:g}) is shorter than "
                                 f"drift.interval_s ({self.drift.interval_s:g})")
        return self

    @property
    def model_name(self) -> str:
        """The name clients put in ``model``."""
        return self.served_model_name or Path(self.model).name.lower()

    def catalog(self) -> dict[str, GpuSpec]:
        extra = {name.lower(): GpuSpec(name=name.lower(), **spec.model_dump()) for name, spec in self.gpu_types.items()}
        return gpu_catalog(extra)

    @property
    def node_size(self) -> int:
        return self.gpus_per_node or self.gpus


    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of the process environment."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(TpgateConfig)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> TpgateConfig:
    """File, then environment (``TPGATE_*``), then explicit overrides (flags, dotted field paths to values;
    ``None`` means not given); invalid values raise :class:`ConfigError`. ``flag_names`` maps a field path to
    the flag that sets it, so a bad flag value is reported under the flag's name (``--gpus must be ...``)."""
    layers: list[dict[str, Any]] = []
    if path is not None:
        try:
            layers.append(read_yaml_mapping(Path(path), what="the configuration"))
        except YamlFileError as exc:
            raise UserError(str(exc)) from None
    try:
        layers.append(_EnvironSource(environ or {})())
    except SettingsError as exc:  # a mapping or list that is not JSON
        field = re.search(r'field "([^"]+)"', str(exc))
        name = ENV_PREFIX + (field.group(1).upper() if field else "*")
        raise UserError(f"invalid configuration: {name} must be JSON for a mapping or a list") from None
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(flags, key.split("."), value)
    layers.append(flags)
    try:
        return TpgateConfig.model_validate(_merge(*layers))
    except ValidationError as exc:
        given = {key for key, value in (overrides or {}).items() if value is not None}
        names = {key: flag for key, flag in (flag_names or {}).items() if key in given}
        problems = [replace(p, where=names.get(p.where, p.where)) for p in field_problems(exc)]
        raise ConfigError(problems) from None


class ConfigError(UserError):
    """An invalid configuration value; ``problems`` name each field, or the flag that set it."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems
        flags_only = all(p.where.startswith("--") for p in problems)
        super().__init__(("" if flags_only else "invalid configuration: ") + "; ".join(str(p) for p in problems))


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; mappings merge key by key (so ``TPGATE_SERVER__PORT`` keeps the file's host)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = _merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value
