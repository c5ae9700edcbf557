"""The planner: model shapes, the GPU catalog and LMDeploy's tensor-parallel rules. Pure logic, no I/O
beyond reading a config.json."""

from gateway.planner.gpus import BUILTIN_GPUS, GpuSpec, find_gpu, gpu_catalog
from gateway.planner.knobs import DEFAULT_KNOBS, EngineKnobs, KnobsError
from gateway.planner.model import ModelSpec, VisionTower, bundled_cards, load_model, model_from_config
from gateway.planner.tp import TpVerdict, divisibility_reason, evaluate_tp, max_replicas, plan

__all__ = [
    "BUILTIN_GPUS",
    "DEFAULT_KNOBS",
    "EngineKnobs",
    "GpuSpec",
    "KnobsError",
    "ModelSpec",
    "TpVerdict",
    "VisionTower",
    "bundled_cards",
    "divisibility_reason",
    "evaluate_tp",
    "find_gpu",
    "gpu_catalog",
    "load_model",
    "max_replicas",
    "model_from_config",
    "plan",
]
