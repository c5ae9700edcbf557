"""Pool specs for tests."""

from gateway.control.state import PoolSpec
from gateway.engines.base import EngineSpec
from gateway.planner import EngineKnobs


def make_pool(pool_id, tp=1, replicas=1, **knobs):
    spec = EngineSpec(engine="sim", model="llama-3-8b", served_model_name="llama-3-8b", gpu="h100-80gb", tp=tp,
                      knobs=EngineKnobs(**knobs))
    return PoolSpec(id=pool_id, engine=spec, replicas=replicas)
