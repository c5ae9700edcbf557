"""LMDeploy engine knobs: the one model of them, used by the configuration, the planner, the engine launchers,
the simulated engine and the tuner.

Names and defaults are LMDeploy 0.18's (``lmdeploy serve api_server --help``). Values are validated where they
enter: a bad one raises :class:`KnobsError` naming the knob and the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import UserError
from gateway.planner.gpus import GpuSpec
from gateway.planner.model import ModelSpec
from gateway.validation import field_problems

Backend = Literal["turbomind", "pytorch"]
QuantPolicy = Literal[0, 4, 8]


class KnobsError(UserError):
    """A knob outside its range; the message names the knob, the value and what is allowed."""


class EngineKnobs(BaseModel):
    """Engine settings that change a replica's capacity and speed. ``None`` means LMDeploy's own default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = "turbomind"
    max_batch_size: int | None = Field(default=None, ge=1, description="None: LMDeploy's default for the GPU type")
    cache_max_entry_count: float = Field(default=0.8, gt=0, le=1,
                                         description="share of GPU memory left after weights given to the KV cache")
    quant_policy: QuantPolicy = Field(default=0, description="KV cache precision: 0 fp16, 8 int8, 4 int4")
    max_prefill_token_num: int = Field(default=8192, ge=1, description="prompt tokens prefilled per engine step")
    session_len: int | None = Field(default=None, ge=1, description="None: the model's max_position_embeddings")

    @classmethod
    def of(cls, values: Mapping[str, Any] | None = None, **more: Any) -> EngineKnobs:
        """Validate knob values from a person (flags, an API body); :class:`KnobsError` on a bad one."""
        try:
            return cls.model_validate({**(values or {}), **more})
        except ValidationError as exc:
            raise KnobsError(str(field_problems(exc)[0])) from None

    def batch_size_on(self, gpu: GpuSpec) -> int:
        return self.max_batch_size or gpu.default_max_batch_size

    def session_len_for(self, model: ModelSpec) -> int:
        return self.session_len or model.max_position_embeddings

    def label(self) -> str:
        """Short form of the knobs that differ from the defaults, for pool ids and tables (``mbs64-kv0.9``)."""
        parts = []
        defaults = DEFAULT_KNOBS
        if self.backend != defaults.backend:
            parts.append(self.backend[:2])
        if self.max_batch_size is not None:
            parts.append(f"mbs{self.max_batch_size}")
        if self.cache_max_entry_count != defaults.cache_max_entry_count:
            parts.append(f"kv{self.cache_max_entry_count:g}")
        if self.quant_policy:
            parts.append(f"q{self.quant_policy}")
        if self.max_prefill_token_num != defaults.max_prefill_token_num:
            parts.append(f"pf{self.max_prefill_token_num}")
        if self.session_len is not None:
            parts.append(f"sl{self.session_len}")
        return "-".join(parts)


DEFAULT_KNOBS = EngineKnobs()
