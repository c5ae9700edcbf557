"""GPU catalog: memory, peak dense bf16 compute, HBM bandwidth and interconnect per GPU type.

Figures are vendor datasheet values (SXM parts for A100/H100/H200). ``memory_mib`` is what ``nvidia-smi``
reports as total memory, which is a little less than the marketing size. Users add their own types in
the configuration file (``gpu_types:``); those take precedence over the built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import UserError

MIB = 1024**2
GB = 1e9


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type. Bandwidths in GB/s (10^9 bytes), compute in TFLOP/s (10^12)."""

    name: str
    memory_mib: int
    bf16_tflops: float
    hbm_gb_per_s: float
    interconnect: str  # "nvlink" or "pcie"
    interconnect_gb_per_s: float
    # LMDeploy's default max_batch_size on this GPU (A100 384, H100/H800/H200 1024, others 128).
    default_max_batch_size: int = 128

    def __post_init__(self) -> None:
        if self.interconnect not in ("nvlink", "pcie"):
            raise UserError(f"gpu {self.name}: interconnect must be 'nvlink' or 'pcie', not {self.interconnect!r}")
        for field in ("memory_mib", "bf16_tflops", "hbm_gb_per_s", "interconnect_gb_per_s", "default_max_batch_size"):
            if getattr(self, field) <= 0:
                raise UserError(f"gpu {self.name}: {field} must be positive, not {getattr(self, field)}")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gb_per_s * GB

    @property
    def interconnect_bytes_per_s(self) -> float:
        return self.interconnect_gb_per_s * GB


BUILTIN_GPUS: dict[str, GpuSpec] = {
    gpu.name: gpu
    for gpu in (
        GpuSpec("a100-40gb", 40536, 312, 1555, "nvlink", 600, default_max_batch_size=384),
        GpuSpec("a100-80gb", 81920, 312, 2039, "nvlink", 600, default_max_batch_size=384),
        GpuSpec("h100-80gb", 81559, 989, 3350, "nvlink", 900, default_max_batch_size=1024),
        GpuSpec("h200-141gb", 143771, 989, 4800, "nvlink", 900, default_max_batch_size=1024),
        GpuSpec("l40s", 46068, 362, 864, "pcie", 32),
        GpuSpec("rtx-4090", 24564, 165, 1008, "pcie", 32),
    )
}


def gpu_catalog(extra: Mapping[str, GpuSpec] | None = None) -> dict[str, GpuSpec]:
    """Built-in GPU types, overridden and extended by ``extra`` (from the configuration file)."""
    return {**BUILTIN_GPUS, **(extra or {})}


def find_gpu(name: str, catalog: Mapping[str, GpuSpec] | None = None) -> GpuSpec:
    catalog = catalog if catalog is not None else BUILTIN_GPUS
    try:
        return catalog[name.lower()]
    except KeyError:
        raise UserError(f"unknown GPU {name!r} (known: {', '.join(sorted(catalog))})") from None
