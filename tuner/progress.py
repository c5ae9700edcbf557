"""What a study prints: one line per trial and an overall progress bar (pure formatting)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tuner.objectives import ObjectiveSpec
from tuner.records import TrialRecord
from tuner.space import Candidate

BAR_WIDTH = 24


def format_value(spec: ObjectiveSpec, value: float | None) -> str:
    if value is None:
        return "-"
    if spec.unit == "s":
        return f"{value:.3g} s" if value >= 1 else f"{value * 1000:.3g} ms"
    return f"{value:,.1f} {spec.unit}"


def trial_line(
    record: TrialRecord, specs: Sequence[ObjectiveSpec], *, position: str, best: TrialRecord | None,
    best_note: str = "",
) -> str:
    """``#4 [3/6] tp2x2 mbs256 kv0.8 q0 pf8192 feasible  e2e p99 2.31 s (predicted 2.05 s)  TTFT p99 210 ms
    <= 500 ms ok ...  best #1 2.10 s``; ``position`` is the count of measured trials (``3/6``) or ``not
    deployed``; ``best_note`` qualifies the best (``worst of 2 runs``)."""
    tags = " guided" if record.guided else ""
    tags += f" repeat of #{record.reused_from}" if record.reused_from is not None else ""
    if record.remeasure_of is not None and record.reused_from is None:
        tags += f" re-measure {record.run} of #{record.remeasure_of}, load seed +{record.run}"
    if record.parallel_round is not None and record.reused_from is None and record.outcome not in ("rejected",
                                                                                                  "avoided"):
        tags += f" round {record.parallel_round}"
    parts = [f"#{record.number} [{position}{tags}] {record.candidate.label()} {record.outcome}"]
    measured: Mapping[str, Any] = record.measured.as_dict() if record.measured is not None else {}
    for spec in specs:
        predicted = record.predicted.get(spec.figure)
        shown = format_value(spec, measured.get(spec.figure)) if measured else "not measured"
        parts.append(f"{spec.label} {shown} (predicted {format_value(spec, predicted)})")
    for slo in record.slo:
        unit = ObjectiveSpec("", "", "minimize", "", "s" if slo.name.endswith("_s") else "")
        if slo.name.endswith("_s"):
            limit, value = format_value(unit, slo.limit), format_value(unit, slo.measured)
        else:
            limit = f"{slo.limit:.2%}"
            value = "-" if slo.measured is None else f"{slo.measured:.2%}"
        parts.append(f"{slo.label} {value} <= {limit} {'ok' if slo.met else 'BROKEN'}")
    if record.reason and record.outcome != "infeasible":
        parts.append(f"({record.reason})")
    if record.clock is not None and record.clock.corrected:
        parts.append(f"clock {record.clock.effective_scale:.3g}x of {record.clock.nominal_scale:g}x")
    if best is not None and best.measured is not None:
        values = best.measured.as_dict()
        note = f" ({best_note})" if best_note else ""
        parts.append(f"best #{best.number} " + ", ".join(format_value(s, values.get(s.figure)) for s in specs)
                     + note)
    else:
        parts.append("no feasible configuration yet")
    return "  ".join(parts)


def round_line(number: int, candidates: Sequence[Candidate], trials: Sequence[int], *, gpus: int) -> str:
    """``round 3: 2 trials at once on 6 of 8 GPUs: #5 tp2x1 ..., #6 tp4x1 ...``."""
    used = sum(c.gpus for c in candidates)
    listed = ", ".join(f"#{n} {c.label()}" for n, c in zip(trials, candidates, strict=True))
    return f"round {number}: {len(candidates)} trials at once on {used} of {gpus} GPUs: {listed}"


def progress_bar(done: int, total: int, *, elapsed_s: float, timeout_s: float | None) -> str:
    """``[#########...............] 3/8 trials  2m10s elapsed  (timeout 20m)``."""
    filled = min(BAR_WIDTH, round(BAR_WIDTH * done / total)) if total else BAR_WIDTH
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    limit = f"  (timeout {_duration(timeout_s)})" if timeout_s is not None else ""
    return f"[{bar}] {done}/{total} trials  {_duration(elapsed_s)} elapsed{limit}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
