"""tpgate's ``Router`` on its own: the same ASGI app the gateway's router replicas run, served by a bare uvicorn
(httptools, uvloop) process in front of one engine, with a fixed routing table instead of the controller and no
Ray Serve around it. `benchmarks/gateway_overhead.py --bare-router` measures it next to the gateway: the floor a
router replica serving its own listener (outside Serve's replica HTTP stack) would approach.

    .venv/bin/python benchmarks/bare_router.py --engine http://127.0.0.1:PORT --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import uvicorn

from gateway.dataplane.router import Router, RouterSettings
from gateway.dataplane.routing import Endpoint, PoolView, RoutingTable
from gateway.dataplane.upstream import Timeouts

MODEL = "llama-3-8b"
POOL = "bench"


class FixedTable:
    """A control plane whose table never changes (the router's :class:`ControlPlane` protocol)."""

    def __init__(self, table: RoutingTable) -> None:
        self._table = table

    async def watch(self, epoch: str, version: int, timeout_s: float) -> RoutingTable | None:
        if (epoch, version) == (self._table.epoch, self._table.version):
            await asyncio.sleep(timeout_s)
            return None
        return self._table

    async def report_inflight(self, router_id: str, epoch: str, version: int,
                              inflight_by_pool: dict[str, int]) -> None:
        return None

    async def raw_status(self) -> dict[str, Any]:
        return {"version": self._table.version}


def one_pool_table(engine_url: str) -> RoutingTable:
    pool = PoolView(POOL, 1, 1, (Endpoint("engine-0", engine_url),))
    return RoutingTable(version=1, epoch="bench", model=MODEL, classes=("interactive", "batch"),
                        default_class="interactive", routes={"interactive": {POOL: 1.0}, "batch": {POOL: 1.0}},
                        pools={POOL: pool})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, help="the engine's base URL")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    timeouts = Timeouts(connect_s=2.0, first_byte_s=300.0, idle_s=120.0, total_s=1800.0)
    router = Router(RouterSettings(timeouts=timeouts), FixedTable(one_pool_table(args.engine)))
    uvicorn.run(router, host="127.0.0.1", port=args.port, http="httptools", loop="uvloop", lifespan="on",
                access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
