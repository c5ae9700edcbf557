"""The control plane in this process, for admin API tests: a real controller (against a recording deployer) behind
the control client's calls, and a study engine that records one feasible trial in real Optuna storage."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

import optuna

from gateway.control.client import client_error, parse_status
from gateway.planner import EngineKnobs
from tuner.records import TrialRecord
from tuner.space import Candidate
from tuner.window import WindowFigures


class LocalControl:
    """:class:`gateway.control.client.ControlClient`'s calls, made on a controller in this process; what it
    raises is mapped as the client maps what the actor raised."""

    def __init__(self, controller):
        self.controller = controller

    async def _call(self, name, *args, **kwargs):
        try:
            result = getattr(self.controller, name)(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        except (ValueError, RuntimeError) as exc:
            raise client_error(exc) from None

    async def status(self):
        return parse_status(await self.raw_status())

    async def raw_status(self):
        return await self._call("status")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        async def call(*args, **kwargs):
            return await self._call(name, *args, **kwargs)

        return call


def figures(**values: Any) -> WindowFigures:
    fields = {name: None for name in WindowFigures.__dataclass_fields__}
    fields.update(clock="engine", window_s=10.0, requests=100.0, errors=0.0, error_rate=0.0, requests_per_s=10.0,
                  output_tokens_per_s=1000.0, prompt_tokens_per_s=5000.0)
    fields.update(values)
    return WindowFigures(**fields)


class StandInEngine:
    """Stands in for ``tuner.tune``: records one trial (``outcome``) in the study's storage as the tuner would,
    says so on ``progress``, then waits until released (or cancelled)."""

    def __init__(self, *, outcome: str = "feasible", tp: int = 1, replicas: int = 1, wait: bool = False):
        self.outcome, self.tp, self.replicas = outcome, tp, replicas
        self.release = asyncio.Event()
        if not wait:
            self.release.set()
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, config, class_name, *, gateway, storage, study_name, n_trials, timeout_s, seed,
                       sampler, progress):
        self.calls.append({"class": class_name, "max_gpus": config.tuning.max_gpus, "n_trials": n_trials,
                           "token": gateway.admin_token, "storage": storage,
                           "profile": config.classes[class_name].profile})
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
        record = TrialRecord(number=0, candidate=Candidate(self.tp, self.replicas, EngineKnobs()),
                             outcome=self.outcome, objectives=(1000.0,), measured=figures(),
                             reason=None if self.outcome == "feasible" else "broke TTFT p99")
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1000.0,
                                                  user_attrs=record.to_attrs()))
        progress(f"#0 [1/{n_trials}] {record.candidate.label()} {self.outcome}")
        await self.release.wait()
        best = (record,) if self.outcome == "feasible" else ()
        return SimpleNamespace(stopped_by="trials", measured_trials=1, best=best)
