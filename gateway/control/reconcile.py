"""What the reconcile loop repairs: the difference between the desired pools and the applications the cluster runs.

Pure: plain values in, repairs out. A desired pool the cluster does not run (its application was deleted behind
the controller's back, or the controller restarted after a half-done operation) is deployed again; an application
of this gateway that no desired or draining pool explains (left by a failed delete, or a pool removed while the
controller was down) is deleted. A pool deployed moments ago is not "missing" yet: the cluster's status lags.
A pool whose deployment failed is reported, not redeployed in a loop: that is the operator's (or the tuner's) call.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AppStatus:
    """What the cluster says of one pool application (Serve's application status, lowercased)."""

    status: str
    message: str = ""


@dataclass(frozen=True)
class Repair:
    pool_id: str
    action: Literal["deploy", "delete"]
    reason: str


def plan_repairs(
    *,
    desired: Collection[str],
    running: Mapping[str, AppStatus],
    draining: Collection[str],
    recently_deployed: Collection[str],
) -> list[Repair]:
    """The repairs that make the cluster match the desired pools, in a stable order."""
    repairs = []
    for pool_id in sorted(desired):
        if pool_id not in running and pool_id not in recently_deployed:
            repairs.append(Repair(pool_id, "deploy", "desired but not running in the cluster"))
    for pool_id in sorted(running):
        if pool_id not in desired and pool_id not in draining and running[pool_id].status != "deleting":
            repairs.append(Repair(pool_id, "delete", "running in the cluster but not desired"))
    return repairs
