"""Run an engine process (``tpgate engine sim``: the simulated LMDeploy engine)."""

from __future__ import annotations

import argparse
import asyncio

from gateway.planner.model import KV_BYTES_BY_QUANT_POLICY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="engine", required=True, parser_class=type(parser))
    sim = kinds.add_parser(
        "sim",
        help="simulated LMDeploy engine (LMDeploy's HTTP API and metrics, timed by the performance model)",
        description="Serve LMDeploy 0.18 api_server's HTTP API for a model on a simulated GPU setup. "
        "Latencies come from tpgate's performance model; no model runs.",
    )
    sim.add_argument("--model", required=True, help="bundled card name (llama-2-7b), model directory or config.json")
    sim.add_argument("--gpu", default="h100-80gb", help="GPU type from the catalog (default: %(default)s)")
    sim.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    sim.add_argument("--port", type=int, default=23333, help="port to listen on, 0 for any (default: %(default)s)")
    sim.add_argument("--max-batch-size", type=int, help="running batch limit (default: LMDeploy's for the GPU)")
    sim.add_argument("--cache-max-entry-count", type=float, default=0.8,
                     help="share of free memory after weights given to the KV cache (default: %(default)s)")
    sim.add_argument("--quant-policy", type=int, default=0, choices=sorted(KV_BYTES_BY_QUANT_POLICY),
                     help="KV cache precision: 0 fp16, 8 int8, 4 int4 (default: %(default)s)")
    sim.add_argument("--max-prefill-token-num", type=int, default=8192,
                     help="prefill tokens per step (chunked prefill; default: %(default)s)")
    sim.add_argument("--session-len", type=int, help="context length (default: the model's max_position_embeddings)")
    sim.add_argument("--time-scale", type=float, default=1.0,
                     help="run the clock this many times faster; metrics stay in simulated seconds (default: 1)")
    sim.add_argument("--deviation", dest="deviation_file", metavar="FILE",
                     help="YAML/JSON factors by which the engine departs from the analytical model")
    sim.add_argument("--model-name", help="name clients use in 'model' (default: the model's name)")
    sim.add_argument("--api-keys", nargs="*", metavar="KEY",
                     help="as LMDeploy: requests need 'Authorization: Bearer <one of these>', except /health")


def run(args: argparse.Namespace) -> int:
    # Imported here so that `tpgate plan` does not pay for aiohttp and prometheus_client.
    import prometheus_client

    from gateway.engines.sim.config import SimEngineConfig, resolve
    from gateway.engines.sim.server import serve

    values = {key: value for key, value in vars(args).items() if key not in ("command", "engine", "api_keys")}
    config = SimEngineConfig.from_values({k: v for k, v in values.items() if v is not None})
    setup = resolve(config)
    prometheus_client.disable_created_metrics()  # as LMDeploy does: no *_created series
    asyncio.run(serve(setup, host=config.host, port=config.port, api_keys=tuple(args.api_keys or ())))
    return 0
