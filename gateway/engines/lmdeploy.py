"""The ``lmdeploy`` launcher: ``lmdeploy serve api_server`` (LMDeploy 0.18) on the GPUs Ray assigned.

The command is ``<python> -m lmdeploy serve api_server MODEL --tp N ...`` with the interpreter that runs the
pool replica, not the ``lmdeploy`` console script: Ray workers run on the gateway's interpreter, but their
``PATH`` need not contain that virtual environment's ``bin/`` (``.venv/bin/tpgate serve`` without an
activated venv), so ``sys.executable -m lmdeploy`` finds the LMDeploy installed next to the gateway and a
bare ``lmdeploy`` might find another one, or none.

Every flag below is checked against LMDeploy 0.18's own parser by
``tests/gateway/engines/test_lmdeploy_launcher.py``. Metrics are on by default in 0.18 (``--disable-metrics``
would turn them off), so no flag is needed for ``/metrics``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from gateway.engines.base import EngineSpec

LMDEPLOY_VERSION = "0.18.0"  # the release whose command line this launcher builds

# LMDeploy's PyTorch engine with TP > 1 picks the "ray" executor by default on CUDA and would ask the
# surrounding Ray cluster for TP more GPUs; "mp" keeps the workers inside the replica's own GPUs. The flag is
# passed for TurboMind too: `api_server --backend turbomind` falls back to the PyTorch engine, silently but for a
# log line, when TurboMind does not support the model, and TurboMind itself ignores the flag.
PYTORCH_MULTI_GPU_EXECUTOR = "mp"


class LmdeployLauncher:
    """Builds the command line and environment of one ``lmdeploy serve api_server`` process. Starts nothing."""

    name = "lmdeploy"

    def __init__(self, *, python: str = sys.executable) -> None:
        self.python = python

    def program(self) -> list[str]:
        """The part of the command before LMDeploy's own arguments (``serve api_server ...``)."""
        return [self.python, "-m", "lmdeploy"]

    def command(self, spec: EngineSpec, *, host: str, port: int, api_key: str | None = None) -> list[str]:
        """argv of ``lmdeploy serve api_server`` for ``spec``, serving on ``host:port`` (with ``api_key``:
        ``--api-keys``, which LMDeploy requires on every path but ``/health``).

        Knobs left as ``None`` (``max_batch_size``, ``session_len``) are omitted so LMDeploy applies its own
        default (by GPU type, and the model's context length). ``spec.extra_args`` come last, verbatim.
        """
        _check_spec(spec)
        knobs = spec.knobs
        argv = [
            *self.program(),
            "serve",
            "api_server",
            spec.model,
            "--model-name",
            spec.served_model_name,
            "--server-name",
            host,
            "--server-port",
            str(port),
            "--backend",
            knobs.backend,
            "--tp",
            str(spec.tp),
            "--cache-max-entry-count",
            repr(knobs.cache_max_entry_count),
            "--quant-policy",
            str(knobs.quant_policy),
            "--max-prefill-token-num",
            str(knobs.max_prefill_token_num),
        ]
        if knobs.max_batch_size is not None:
            argv += ["--max-batch-size", str(knobs.max_batch_size)]
        if knobs.session_len is not None:
            argv += ["--session-len", str(knobs.session_len)]
        if spec.tp > 1:
            argv += ["--distributed-executor-backend", PYTORCH_MULTI_GPU_EXECUTOR]
        if api_key is not None:
            argv += ["--api-keys", api_key]
        argv += spec.extra_args
        return argv

    def environment(self, spec: EngineSpec, *, gpu_ids: Sequence[str]) -> Mapping[str, str]:
        """``CUDA_VISIBLE_DEVICES`` set to the ``spec.tp`` GPU ids Ray assigned to the replica.

        Raises ValueError when Ray assigned a different number of GPUs than the engine's TP size: LMDeploy
        would fail later, on the GPU, with a less helpful message.
        """
        if len(gpu_ids) != spec.tp:
            raise ValueError(
                f"tp={spec.tp} needs {spec.tp} GPU ids, but Ray assigned {len(gpu_ids)}: {list(gpu_ids)!r}"
            )
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(gpu_id) for gpu_id in gpu_ids)}


def _check_spec(spec: EngineSpec) -> None:
    if spec.engine != LmdeployLauncher.name:
        raise ValueError(f"the lmdeploy launcher cannot run an engine spec for {spec.engine!r}")
    if spec.tp < 1:
        raise ValueError(f"tp must be at least 1, not {spec.tp}")
    if not spec.model:
        raise ValueError("the engine spec names no model (a model directory or hub id)")
