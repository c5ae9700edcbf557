"""The simulated engine's configuration: validated where it enters, then resolved against the planner."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.engines.sim.batch import BatchLimits
from gateway.errors import UserError
from gateway.planner import EngineKnobs, GpuSpec, ModelSpec, evaluate_tp, find_gpu, load_model
from gateway.planner.perf import KV_BLOCK_TOKENS, Deviation
from gateway.validation import field_problems


class SimEngineConfig(BaseModel):
    """Everything ``tpgate engine sim`` is told (LMDeploy's flag names, plus the simulator's own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="bundled card name, model directory or config.json")
    gpu: str = "h100-80gb"
    tp: int = Field(default=1, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(default=23333, ge=0, le=65535)
    knobs: EngineKnobs = Field(default_factory=EngineKnobs)
    time_scale: float = Field(default=1.0, gt=0, le=10_000)
    deviation_file: str | None = None
    model_name: str | None = Field(default=None, min_length=1)

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> SimEngineConfig:
        """From flat values (``tpgate engine sim``'s flags): knob names go into ``knobs``."""
        knob_names = EngineKnobs.model_fields.keys()
        data = {k: v for k, v in values.items() if k not in knob_names}
        data["knobs"] = {k: v for k, v in values.items() if k in knob_names}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"engine sim: {field_problems(exc, skip_root=('knobs',))[0]}") from None


@dataclass(frozen=True)
class SimEngineSetup:
    """A configuration resolved against the planner: what the running engine simulates."""

    served_model_name: str
    model: ModelSpec
    gpu: GpuSpec
    tp: int
    knobs: EngineKnobs
    max_batch_size: int
    session_len: int
    kv_cache_blocks: int
    time_scale: float
    deviation: Deviation

    @property
    def kv_cache_tokens(self) -> int:
        return self.kv_cache_blocks * KV_BLOCK_TOKENS

    @property
    def limits(self) -> BatchLimits:
        """The batch limits TurboMind derives from these settings."""
        return BatchLimits.turbomind(
            max_batch_size=self.max_batch_size, kv_cache_blocks=self.kv_cache_blocks,
            max_prefill_token_num=self.knobs.max_prefill_token_num, session_len=self.session_len, tp=self.tp,
            block_tokens=KV_BLOCK_TOKENS,
        )


def resolve(config: SimEngineConfig, *, catalog: Mapping[str, GpuSpec] | None = None) -> SimEngineSetup:
    """Load the model and GPU, apply the planner's TP rules (UserError with its reason when rejected)."""
    model = load_model(config.model)
    gpu = find_gpu(config.gpu, catalog)
    knobs = config.knobs
    verdict = evaluate_tp(model, gpu, config.tp, gpus=config.tp, gpus_per_node=config.tp, knobs=knobs)
    if not verdict.feasible:
        raise UserError(f"cannot simulate {model.name} on {gpu.name}: {verdict.reason}")
    deviation = load_deviation(config.deviation_file) if config.deviation_file else Deviation()
    setup = SimEngineSetup(
        served_model_name=config.model_name or model.name,
        model=model,
        gpu=gpu,
        tp=config.tp,
        knobs=knobs,
        max_batch_size=knobs.batch_size_on(gpu),
        session_len=knobs.session_len_for(model),
        kv_cache_blocks=verdict.kv_cache_tokens_per_replica // KV_BLOCK_TOKENS,
        time_scale=config.time_scale,
        deviation=deviation,
    )
    forward_tokens = knobs.max_prefill_token_num + setup.max_batch_size
    if forward_tokens < KV_BLOCK_TOKENS:
        raise UserError(
            f"cannot simulate {model.name}: max_prefill_token_num + max_batch_size ({forward_tokens}) is less than "
            f"one KV block ({KV_BLOCK_TOKENS} tokens), so a long prompt could never be prefilled"
        )
    return setup


def load_deviation(path: str | Path) -> Deviation:
    """Read a deviation file: YAML or JSON mapping of :class:`~gateway.planner.perf.Deviation` fields."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read deviation file: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: malformed deviation file: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a deviation file holds a mapping of factors, not {type(data).__name__}")
    return Deviation.from_mapping(data, source=str(path))
