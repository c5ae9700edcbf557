"""The study's winner as a configuration ``tpgate serve --config`` accepts.

Pure. The file holds the study's deployment (model, GPUs, engine, classes) and ``pools:``/``routes:``: the
class's route goes to one pool of the winning configuration; the other classes keep what they had (the
configured pools and routes, or the planner's default pool per class). ``auth``, ``server`` and ``router`` are
left out: they belong to the deployment's own file and may hold secrets; copy them over.
"""

from __future__ import annotations

from typing import Any

import yaml

from gateway.config import TpgateConfig
from gateway.control.initial_state import initial_state
from gateway.control.state import Capacity
from gateway.planner import DEFAULT_KNOBS, find_gpu, load_model
from tuner.space import Candidate

LEFT_OUT = ("auth", "server", "router", "tuning", "pools", "routes")


def winner_pool_id(class_name: str, candidate: Candidate) -> str:
    """``batch-tp2x2``: lowercase letters, digits and '-'."""
    return f"{class_name}-tp{candidate.tp}x{candidate.replicas}".lower().replace("_", "-")


def winner_config(config: TpgateConfig, class_name: str, candidate: Candidate) -> dict[str, Any]:
    """The configuration mapping with ``class_name`` served by ``candidate``."""
    capacity = Capacity(model=load_model(config.model), gpu=find_gpu(config.gpu, config.catalog()),
                        gpus=config.gpus, gpus_per_node=config.node_size)
    state = initial_state(config, capacity)
    routes = {name: dict(weights) for name, weights in state.routes.items()}
    pool_id = winner_pool_id(class_name, candidate)
    while pool_id in state.pools and any(pool_id in w for name, w in routes.items() if name != class_name):
        pool_id += "-tuned"
    routes[class_name] = {pool_id: 1.0}
    used = {p for weights in routes.values() for p in weights}
    pools: dict[str, Any] = {}
    for other_id, pool in state.pools.items():
        if other_id in used and other_id != pool_id:
            pools[other_id] = {"tp": pool.tp, "replicas": pool.replicas, "knobs": _knobs(pool.engine.knobs)}
    pools[pool_id] = {"tp": candidate.tp, "replicas": candidate.replicas, "knobs": _knobs(candidate.knobs)}
    data = config.model_dump(mode="json", exclude=set(LEFT_OUT))
    data.update(pools=pools, routes=routes)
    return data


def winner_yaml(config: TpgateConfig, class_name: str, candidate: Candidate, *, study_name: str) -> str:
    """:func:`winner_config` as a commented YAML document."""
    header = (f"# tpgate tune: the winner of study {study_name!r} for class {class_name!r}: {candidate.label()}\n"
              "# Serve it with `tpgate serve --config <this file>`; auth, server and router settings are not\n"
              "# written here (they may hold secrets): copy them from your own configuration.\n")
    return header + yaml.safe_dump(winner_config(config, class_name, candidate), sort_keys=False)


def _knobs(knobs: Any) -> dict[str, Any]:
    """Knobs that differ from LMDeploy's defaults (the rest are left to them)."""
    return {name: value for name, value in knobs.model_dump().items() if value != getattr(DEFAULT_KNOBS, name)}
