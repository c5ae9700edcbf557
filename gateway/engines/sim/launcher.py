"""Launcher of the simulated engine: ``tpgate engine sim`` in a child Python process."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from gateway.engines.base import EngineSpec


class SimLauncher:
    """Builds the command line of a simulated engine from an :class:`EngineSpec` (starts nothing)."""

    name = "sim"

    def __init__(self, *, python: str | None = None) -> None:
        self._python = python or sys.executable

    def command(self, spec: EngineSpec, *, host: str, port: int, api_key: str | None = None) -> list[str]:
        knobs = spec.knobs
        argv = [
            self._python, "-m", "gateway.cli", "engine", "sim",
            "--model", spec.model,
            "--model-name", spec.served_model_name,
            "--gpu", spec.gpu,
            "--tp", str(spec.tp),
            "--host", host,
            "--port", str(port),
            "--cache-max-entry-count", repr(knobs.cache_max_entry_count),
            "--quant-policy", str(knobs.quant_policy),
            "--max-prefill-token-num", str(knobs.max_prefill_token_num),
            "--time-scale", repr(spec.time_scale),
        ]
        if knobs.max_batch_size is not None:
            argv += ["--max-batch-size", str(knobs.max_batch_size)]
        if knobs.session_len is not None:
            argv += ["--session-len", str(knobs.session_len)]
        if spec.deviation_file is not None:
            argv += ["--deviation", spec.deviation_file]
        if api_key is not None:
            argv += ["--api-keys", api_key]
        return argv + list(spec.extra_args)

    def environment(self, spec: EngineSpec, *, gpu_ids: Sequence[str]) -> Mapping[str, str]:
        """The simulator uses no GPU, but passes the assignment on as a real engine would see it."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)}
