import pytest

from gateway.control.state import Capacity
from gateway.planner import find_gpu, load_model


@pytest.fixture(scope="session")
def capacity():
    """Llama-3-8B on 4 simulated H100s (TP 1, 2, 4 feasible)."""
    return Capacity(model=load_model("llama-3-8b"), gpu=find_gpu("h100-80gb"), gpus=4, gpus_per_node=4)
