"""Engine launchers by name: ``sim`` (the simulated LMDeploy engine, the default) and ``lmdeploy`` (real GPUs).

A pool replica looks its launcher up with :func:`get_launcher` (``EngineSpec.engine``), builds the command
and environment, and runs the process itself; launchers are pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gateway.engines.base import EngineLauncher, EngineSpec
from gateway.engines.lmdeploy import LmdeployLauncher
from gateway.engines.sim.launcher import SimLauncher
from gateway.errors import UserError

LAUNCHERS: Mapping[str, EngineLauncher] = MappingProxyType(
    {launcher.name: launcher for launcher in (SimLauncher(), LmdeployLauncher())}
)


def get_launcher(name: str) -> EngineLauncher:
    """The launcher called ``name``; UserError naming the known ones otherwise."""
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise UserError(f"unknown engine {name!r}; known engines: {', '.join(sorted(LAUNCHERS))}") from None


__all__ = ["LAUNCHERS", "EngineLauncher", "EngineSpec", "LmdeployLauncher", "SimLauncher", "get_launcher"]
