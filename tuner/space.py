"""The search space of one workload class: pool shapes (TP size x replicas) and engine knobs, bounded by the planner.

Pure logic. The space is a box the sampler can move in freely: TP sizes that LMDeploy can split the model into
(divisibility, one node, weights fit for some knob values), a replica range, and the knob choices of the
configuration (``tuning.knobs``). Inside the box, :meth:`SearchSpace.check` is the planner's verdict on one
combination: over the study's GPU budget, or a KV cache too small for one session at those knobs, is a reason,
and such a combination is never deployed (the study tells the sampler it is infeasible, so it learns the edge).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import TpgateConfig
from gateway.control.initial_state import class_budgets
from gateway.control.state import StateError
from gateway.errors import UserError
from gateway.planner import EngineKnobs, GpuSpec, ModelSpec, TpVerdict, evaluate_tp, find_gpu, load_model

KNOB_NAMES = ("max_batch_size", "cache_max_entry_count", "quant_policy", "max_prefill_token_num")
KnobValue = int | float


@dataclass(frozen=True)
class Candidate:
    """One configuration a trial can deploy: ``replicas`` engines of ``tp`` GPUs each, with ``knobs``."""

    tp: int
    replicas: int
    knobs: EngineKnobs

    @property
    def gpus(self) -> int:
        return self.tp * self.replicas

    @property
    def shape(self) -> tuple[int, int]:
        return self.tp, self.replicas

    def params(self) -> dict[str, Any]:
        """The Optuna parameters of this candidate (``tp``, ``replicas`` and every tuned knob)."""
        return {"tp": self.tp, "replicas": self.replicas, **{name: getattr(self.knobs, name) for name in KNOB_NAMES}}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Candidate:
        """The candidate of Optuna parameters (or of a record's ``params``); the knobs are validated."""
        knobs = EngineKnobs.of({name: params[name] for name in KNOB_NAMES if name in params})
        return cls(tp=int(params["tp"]), replicas=int(params["replicas"]), knobs=knobs)

    def label(self) -> str:
        """Readable and unique: ``tp2x2 mbs256 kv0.8 q0 pf8192``."""
        k = self.knobs
        return (f"tp{self.tp}x{self.replicas} mbs{k.max_batch_size} kv{k.cache_max_entry_count:g} "
                f"q{k.quant_policy} pf{k.max_prefill_token_num}")

    def slug(self) -> str:
        """The label as a pool-id fragment (lowercase letters, digits and '-'): ``tp2x2-mbs256-kv8-q0-pf8192``."""
        share = f"{self.knobs.cache_max_entry_count:g}"
        share = share[2:] if share.startswith("0.") else share.replace(".", "p")
        return "-".join(["tp" + f"{self.tp}x{self.replicas}", f"mbs{self.knobs.max_batch_size}", f"kv{share}",
                         f"q{self.knobs.quant_policy}", f"pf{self.knobs.max_prefill_token_num}"])


@dataclass(frozen=True)
class SearchSpace:
    """The configurations a study of ``class_name`` may try, and the planner's rules for them."""

    class_name: str
    model: ModelSpec
    gpu: GpuSpec
    gpus: int  # GPUs the study may use at once
    gpus_per_node: int
    tp_sizes: tuple[int, ...]  # TP sizes the sampler chooses from
    excluded_tp: Mapping[int, str]  # TP sizes left out of the box, with the planner's reason
    min_replicas: int
    max_replicas: int
    knob_choices: Mapping[str, tuple[KnobValue, ...]]  # knob name -> values, in the configuration's order

    def verdict(self, candidate: Candidate) -> TpVerdict:
        """The planner's verdict on the candidate's TP size at its knobs, for the study's GPU budget."""
        return evaluate_tp(self.model, self.gpu, candidate.tp, gpus=self.gpus, gpus_per_node=self.gpus_per_node,
                           knobs=candidate.knobs)

    def check(self, candidate: Candidate) -> str | None:
        """Why the planner rejects ``candidate`` (None when it can be deployed)."""
        if candidate.tp in self.excluded_tp:
            return self.excluded_tp[candidate.tp]
        if candidate.tp not in self.tp_sizes:
            return f"tp={candidate.tp} is outside the study's TP sizes {list(self.tp_sizes)}"
        if not self.min_replicas <= candidate.replicas <= self.max_replicas:
            return f"{candidate.replicas} replicas: outside {self.min_replicas}-{self.max_replicas}"
        for name in KNOB_NAMES:
            if candidate.params()[name] not in self.knob_choices[name]:
                return f"{name}={candidate.params()[name]} is not one of {list(self.knob_choices[name])}"
        verdict = self.verdict(candidate)
        if not verdict.feasible:
            return verdict.reason
        if candidate.replicas > verdict.max_replicas:
            return (f"{candidate.replicas} x tp{candidate.tp} needs {candidate.gpus} GPUs, more than the "
                    f"{self.gpus} the study may use")
        return None

    def candidates(self) -> list[Candidate]:
        """Every combination the planner accepts, TP ascending, then replicas, then knobs as configured."""
        found = []
        for tp, replicas in itertools.product(self.tp_sizes, range(self.min_replicas, self.max_replicas + 1)):
            if tp * replicas > self.gpus:
                continue
            for values in itertools.product(*(self.knob_choices[name] for name in KNOB_NAMES)):
                candidate = Candidate(tp, replicas, EngineKnobs.of(dict(zip(KNOB_NAMES, values, strict=True))))
                if self.check(candidate) is None:
                    found.append(candidate)
        return found

    def describe(self) -> dict[str, Any]:
        """JSON-safe description (stored with the study; its hash names the default study)."""
        return {
            "class": self.class_name,
            "model": self.model.name,
            "gpu": self.gpu.name,
            "gpus": self.gpus,
            "gpus_per_node": self.gpus_per_node,
            "tp_sizes": list(self.tp_sizes),
            "excluded_tp": {str(tp): reason for tp, reason in self.excluded_tp.items()},
            "replicas": [self.min_replicas, self.max_replicas],
            "knobs": {name: list(values) for name, values in self.knob_choices.items()},
        }

    def fingerprint(self) -> str:
        """Eight hex digits that change whenever the space does."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:8]


def study_gpus(config: TpgateConfig, class_name: str, *, gpus_free: int | None = None) -> int:
    """GPUs a study of ``class_name`` may use: the class's budget, capped by the GPUs free (tuning inside a
    running gateway) and by ``tuning.max_gpus``."""
    if class_name not in config.classes:
        raise UserError(f"unknown class {class_name!r} (classes: {', '.join(config.classes)})")
    try:
        budget = class_budgets(config)[class_name]
    except StateError as exc:
        raise UserError(str(exc)) from None
    for cap in (gpus_free, config.tuning.max_gpus):
        if cap is not None:
            budget = min(budget, cap)
    if budget < 1:
        raise UserError(f"class {class_name!r}: no GPU is free for a study")
    return budget


def build_space(config: TpgateConfig, class_name: str, *, gpus_free: int | None = None) -> SearchSpace:
    """The search space of ``class_name`` from the configuration (model, GPU type, budget, ``tuning``).

    Raises UserError when no configuration at all fits (the message names the planner's reasons).
    """
    gpus = study_gpus(config, class_name, gpus_free=gpus_free)
    model = load_model(config.model)
    gpu = find_gpu(config.gpu, config.catalog())
    node = min(config.node_size, gpus)
    choices = config.tuning.knobs
    knob_choices: dict[str, tuple[KnobValue, ...]] = {name: tuple(getattr(choices, name)) for name in KNOB_NAMES}
    tp_sizes, excluded = [], {}
    for tp in range(1, node + 1):
        reason = _tp_exclusion(model, gpu, tp, gpus=gpus, gpus_per_node=config.node_size, knob_choices=knob_choices)
        if reason is None:
            tp_sizes.append(tp)
        else:
            excluded[tp] = reason
    if not tp_sizes:
        raise UserError(f"class {class_name!r}: no TP size fits its {gpus} GPUs at any tuned knob values: "
                        + "; ".join(excluded.values()))
    tuning = config.tuning
    most = max(gpus // tp for tp in tp_sizes)
    max_replicas = min(most, tuning.max_replicas) if tuning.max_replicas is not None else most
    if max_replicas < tuning.min_replicas:
        raise UserError(f"class {class_name!r}: tuning.min_replicas={tuning.min_replicas} does not fit its "
                        f"{gpus} GPUs at tp={min(tp_sizes)}")
    return SearchSpace(
        class_name=class_name, model=model, gpu=gpu, gpus=gpus, gpus_per_node=config.node_size,
        tp_sizes=tuple(tp_sizes), excluded_tp=excluded, min_replicas=tuning.min_replicas,
        max_replicas=max_replicas, knob_choices=knob_choices,
    )


def _tp_exclusion(
    model: ModelSpec, gpu: GpuSpec, tp: int, *, gpus: int, gpus_per_node: int,
    knob_choices: Mapping[str, tuple[KnobValue, ...]],
) -> str | None:
    """Why no knob values in the space make ``tp`` feasible (None when some do). Only the knobs the planner
    reads (KV-cache share and precision) are varied."""
    reason = None
    for share, quant in itertools.product(knob_choices["cache_max_entry_count"], knob_choices["quant_policy"]):
        knobs = EngineKnobs.of(cache_max_entry_count=share, quant_policy=quant)
        verdict = evaluate_tp(model, gpu, tp, gpus=gpus, gpus_per_node=gpus_per_node, knobs=knobs)
        if verdict.feasible:
            return None
        reason = reason or verdict.reason
    return reason
