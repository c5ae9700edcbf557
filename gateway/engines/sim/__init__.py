"""The simulated LMDeploy engine: LMDeploy 0.18 ``api_server``'s HTTP API and metrics, timed by the planner's
performance model, for machines without GPUs. Start one with ``tpgate engine sim``."""

from gateway.engines.sim.config import SimEngineConfig, SimEngineSetup, load_deviation, resolve
from gateway.engines.sim.launcher import SimLauncher

__all__ = ["SimEngineConfig", "SimEngineSetup", "SimLauncher", "load_deviation", "resolve"]
