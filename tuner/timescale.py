"""Simulated engines run their clock faster than the wall clock; trial figures are recorded in the engine's clock.

Pure. A simulated engine at time scale ``s`` runs ``s`` simulated seconds per wall second — nominally. When the
CPU is busy its sleeps end late and its clock falls behind (about 9 % at scale 10 with 128-256 clients on a
2-core machine), so the scale that actually held over a window is read from the engines themselves: their
``simulated_time_s`` at the window's start and end, over the wall time between the readings.

- Gateway figures are wall-clock; in the engine's clock durations are ``x s_eff`` and rates ``/ s_eff``, with
  ``s_eff`` the mean effective scale of the pool's replicas.
- Lag up to ``max_clock_lag_ratio`` (``1 - s_eff / s`` of the worst replica) is corrected that way: the lag is
  spread over the window's steps, so latencies stretch by the same factor as the clock. Beyond it the trial is
  invalid: a clock that far behind means the machine, not the configuration, set the pace.
- Before a run, the load profile is put into wall time: closed-loop think times and timeouts ``/ s``, open-loop
  arrival and spawn rates ``x s``. Warm-up and window are wall seconds (they bound the trial's wall time).
- Wall-clock overheads outside the engine (the gateway's own milliseconds) are multiplied by ``s`` too: at scale
  10 a 2 ms gateway hop reads as 20 ms of engine time. Compare configurations at the same scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from loadtests.profile import Profile, validate_profile
from tuner.window import WindowFigures


@dataclass(frozen=True)
class ClockReading:
    """One engine replica's simulated clock (``simulated_s``) read at wall time ``wall_s``."""

    wall_s: float
    simulated_s: float


@dataclass(frozen=True)
class ClockCheck:
    """How the engines' clocks ran over a window, and whether the window's figures can be trusted."""

    nominal_scale: float
    effective_scale: float  # mean over the pool's replicas
    lag_ratio: float  # worst replica: 1 - effective / nominal (negative when a clock ran fast)
    tolerance: float
    valid: bool
    reason: str | None = None
    per_replica: Mapping[str, float] = field(default_factory=dict)  # replica id -> effective scale
    restarted: tuple[str, ...] = ()  # replicas whose clock went back: their engine restarted in the window

    @property
    def corrected(self) -> bool:
        """Whether figures were converted with a scale other than the nominal one."""
        return self.valid and self.effective_scale != self.nominal_scale

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_replica"] = dict(self.per_replica)
        data["restarted"] = list(self.restarted)
        return data


def real_clock() -> ClockCheck:
    """Engines on real GPUs: wall clock is engine clock."""
    return ClockCheck(nominal_scale=1.0, effective_scale=1.0, lag_ratio=0.0, tolerance=0.0, valid=True)


def check_clocks(
    start: Mapping[str, ClockReading],
    end: Mapping[str, ClockReading],
    *,
    nominal_scale: float,
    tolerance: float,
) -> ClockCheck:
    """The effective scale of each replica over the window and the verdict: valid when every replica's clock
    is within ``tolerance`` (a ratio) of ``nominal_scale``."""
    if not nominal_scale > 0:
        raise ValueError(f"nominal_scale must be positive, not {nominal_scale}")
    per_replica: dict[str, float] = {}
    problems, restarted = [], []
    for replica in sorted(set(start) | set(end)):
        if replica not in start or replica not in end:
            missing = "end" if replica in start else "start"
            problems.append(f"replica {replica} has no clock reading at the window's {missing}")
            continue
        wall_s = end[replica].wall_s - start[replica].wall_s
        simulated_s = end[replica].simulated_s - start[replica].simulated_s
        if not wall_s > 0:
            problems.append(f"replica {replica}: clock read {wall_s:g} s apart")
            continue
        if simulated_s < 0:
            problems.append(f"replica {replica}: simulated clock went back {-simulated_s:g} s (engine restarted)")
            restarted.append(replica)
            continue
        per_replica[replica] = simulated_s / wall_s
    if not per_replica:
        problems.append("no engine clock could be read")
        return ClockCheck(nominal_scale, nominal_scale, 0.0, tolerance, valid=False, reason="; ".join(problems),
                          restarted=tuple(restarted))
    effective = sum(per_replica.values()) / len(per_replica)
    lags = {replica: 1 - scale / nominal_scale for replica, scale in per_replica.items()}
    worst = max(lags, key=lambda replica: abs(lags[replica]))
    if abs(lags[worst]) > tolerance:
        problems.append(
            f"replica {worst}'s clock ran at {per_replica[worst]:.3g}x instead of {nominal_scale:g}x "
            f"({lags[worst]:+.1%} lag, tolerance {tolerance:.0%})"
        )
    return ClockCheck(
        nominal_scale=nominal_scale,
        effective_scale=effective,
        lag_ratio=lags[worst],
        tolerance=tolerance,
        valid=not problems,
        reason="; ".join(problems) or None,
        per_replica=per_replica,
        restarted=tuple(restarted),
    )


def to_engine_clock(figures: WindowFigures, check: ClockCheck) -> WindowFigures:
    """Wall-clock figures in the engines' clock, at the window's effective scale."""
    if figures.clock != "wall":
        raise ValueError("figures are already in the engine's clock")
    return replace(figures.scaled(check.effective_scale), clock="engine")


def wall_profile(
    profile: Profile, time_scale: float, *, warmup_s: float, duration_s: float, route: str
) -> Profile:
    """The class's profile as a trial runs it against engines at ``time_scale``: its times in wall seconds,
    its requests on the trial ``route`` (``x-workload-class`` header), warm-up and duration (wall seconds)
    from the tuning settings."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be positive, not {time_scale}")
    data = profile.model_dump(mode="json")
    arrival = data["arrival"]
    if arrival["kind"] == "closed":
        arrival["think_time_s"] = _scaled_distribution(arrival["think_time_s"], 1 / time_scale)
    else:
        arrival["rate_per_s"] = arrival["rate_per_s"] * time_scale
    if data.get("spawn_rate_per_s") is not None:
        data["spawn_rate_per_s"] = data["spawn_rate_per_s"] * time_scale
    data["request_timeout_s"] = data["request_timeout_s"] / time_scale
    data["drain_timeout_s"] = data["drain_timeout_s"] / time_scale
    data["warmup_s"] = warmup_s
    data["duration_s"] = duration_s
    data["workload_class"] = {"name": route, "via": "header"}
    return validate_profile(data, source=f"profile {profile.name} at time scale {time_scale:g}")


def _scaled_distribution(distribution: dict[str, Any], factor: float) -> dict[str, Any]:
    scaled = dict(distribution)
    for key in ("value", "low", "high", "mean"):
        if scaled.get(key) is not None:
            scaled[key] = scaled[key] * factor
    return scaled
