"""The one typed configuration object, loaded once per process from a YAML file, then ``TPGATE_*``
environment overrides, then command-line flags, and passed down.

Environment overrides name a field path with double underscores: ``TPGATE_GPUS=4``,
``TPGATE_SERVER__PORT=9000``. Values are parsed as YAML scalars (``4`` is an int, ``true`` a bool).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import UserError
from gateway.planner import GpuSpec, gpu_catalog

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


class TpgateConfig(StrictModel):
    """Everything a tpgate process needs to know."""

    model: str = "internvl2_5-38b"
    gpu: str = "h100-80gb"
    gpus: int = Field(default=8, ge=1, description="GPU budget")
    gpus_per_node: int | None = Field(default=None, ge=1, description="defaults to the budget (one node)")
    gpu_types: dict[str, GpuTypeConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gpu_is_known(self) -> TpgateConfig:
        if self.gpu.lower() not in self.catalog():
            raise ValueError(f"unknown gpu {self.gpu!r} (known: {', '.join(sorted(self.catalog()))})")
        return self

    def catalog(self) -> dict[str, GpuSpec]:
        extra = {name.lower(): GpuSpec(name=name.lower(), **spec.model_dump()) for name, spec in self.gpu_types.items()}
        return gpu_catalog(extra)

    @property
    def node_size(self) -> int:
        return self.gpus_per_node or self.gpus


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TpgateConfig:
    """File, then environment (``TPGATE_*``), then explicit overrides (flags); invalid values raise UserError."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for key, value in (environ or {}).items():
        if key.startswith(ENV_PREFIX):
            _set_path(data, key.removeprefix(ENV_PREFIX).lower().split("__"), yaml.safe_load(value))
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, key.split("."), value)
    try:
        return TpgateConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"invalid configuration: {_describe(exc)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML: {exc}".replace("\n", " ")) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: the configuration must be a mapping")
    return loaded


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "config"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
