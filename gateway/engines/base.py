"""The engine launcher interface: how a pool replica turns an engine specification into a process.

Two implementations, picked from :data:`gateway.engines.LAUNCHERS` by name: ``sim`` (the simulated
LMDeploy engine, the embedded default) and ``lmdeploy`` (``lmdeploy serve api_server`` on real GPUs).
Both serve the same HTTP API and the same ``lmdeploy:`` metrics on ``host:port``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.planner import EngineKnobs


@dataclass(frozen=True)
class EngineSpec:
    """One engine configuration: what a pool runs on each of its replicas."""

    engine: str  # launcher name: "sim" or "lmdeploy"
    model: str  # bundled card name (sim), model directory or hub id (lmdeploy)
    served_model_name: str  # the name clients use in "model"
    gpu: str  # GPU type name from the catalog (the simulator models it; LMDeploy detects it)
    tp: int
    knobs: EngineKnobs = field(default_factory=EngineKnobs)
    time_scale: float = 1.0  # sim only: run the clock this many times faster
    deviation_file: str | None = None  # sim only: departures from the analytical model
    extra_args: tuple[str, ...] = ()  # appended verbatim to the engine's command line


class EngineLauncher(Protocol):
    """Builds the command line and environment of one engine process.

    Implementations are pure: they start nothing. The pool replica runs the command in its own process
    group, on a port it picked on the configured host (loopback unless ``engine.host`` says otherwise), with the
    GPUs Ray assigned.
    """

    name: str

    def command(self, spec: EngineSpec, *, host: str, port: int, api_key: str | None = None) -> list[str]:
        """argv of the engine process, serving on ``host:port``; with ``api_key``, requiring it (LMDeploy's
        ``--api-keys``) on every path but ``/health``."""
        ...

    def environment(self, spec: EngineSpec, *, gpu_ids: Sequence[str]) -> Mapping[str, str]:
        """Variables to add to the inherited environment (e.g. ``CUDA_VISIBLE_DEVICES``)."""
        ...
