"""Tabular benchmarks of the search: a class's whole grid measured once through the real trial path, then
replayed as the measurement of whole studies.

Pure (reading and writing JSON aside). A :class:`GridTable` holds, for every configuration of a class's search
space, ``runs`` measurements, run ``n`` with the load profile's seed plus ``n`` — exactly what a study's
re-measurements would measure — each as the :class:`~tuner.records.TrialRecord` the study would have recorded
(figures in the engines' clock, SLO verdicts, constraint values, the engines' clock check, timings). Invalid
measurements (a clock that lagged beyond the tolerance) are not rows: they were measured again, and their
reasons are kept beside the row.

A :class:`TableRunner` is a trial runner whose measurement is a lookup: the ``run``-th measurement of a
configuration is one of its stored runs, which one rotated by the replay's seed, so that across seeds every
stored run is a configuration's first measurement as often as any other (NAS-Bench's way of replaying noise
that was measured, not modelled). The *truth* of a configuration is the mean of its runs' figures; it is
feasible when that mean meets every SLO.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.config import SloConfig
from tuner.evaluate import Measurement
from tuner.objectives import ObjectiveSpec, objective_specs, slo_results
from tuner.records import RECORD_ATTR, TrialRecord
from tuner.space import Candidate
from tuner.standings import candidate_key
from tuner.timescale import real_clock

FORMAT = "tpgate-grid/1"
TRUTH_FIGURES = ("requests_per_s", "output_tokens_per_s", "goodput_requests_per_s", "error_rate", "ttft_p50_s",
                 "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s")


class TableError(ValueError):
    """A grid table that cannot be used (missing rows, another format); the message says which."""


@dataclass(frozen=True)
class GridRow:
    """One configuration of the grid: its measured runs (run 0 first) and the measurements that were thrown
    away as invalid before each run stood (their reasons)."""

    candidate: Candidate
    runs: tuple[TrialRecord, ...]
    invalid: tuple[str, ...] = ()
    measuring_s: float = 0.0  # wall seconds spent measuring this row, invalid attempts included

    def truth(self) -> dict[str, float | None]:
        """The mean over the runs of each figure (None where a run lacks it, or the configuration failed)."""
        figures = [r.measured.as_dict() for r in self.runs if r.measured is not None and r.outcome != "failed"]
        if len(figures) < len(self.runs) or not figures:
            return {name: None for name in TRUTH_FIGURES}
        means: dict[str, float | None] = {}
        for name in TRUTH_FIGURES:
            values = [f.get(name) for f in figures]
            means[name] = None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]
        return means

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.candidate.label(),
            "params": self.candidate.params(),
            "runs": [r.to_attrs()[RECORD_ATTR] for r in self.runs],
            "invalid": list(self.invalid),
            "measuring_s": self.measuring_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GridRow:
        return cls(
            candidate=Candidate.from_params(data["params"]),
            runs=tuple(TrialRecord.from_attrs({RECORD_ATTR: run}) for run in data["runs"]),
            invalid=tuple(data.get("invalid") or ()),
            measuring_s=float(data.get("measuring_s") or 0.0),
        )


@dataclass(frozen=True)
class GridTable:
    """A class's grid: what was measured (``meta``: model, GPUs, class, objectives, SLOs, search space,
    engine and deviation, measuring settings, the command and how long it took) and one row per configuration."""

    meta: Mapping[str, Any]
    rows: tuple[GridRow, ...] = ()
    _by_key: Mapping[tuple[Any, ...], GridRow] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {candidate_key(r.candidate): r for r in self.rows})

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "grid"))

    @property
    def specs(self) -> tuple[ObjectiveSpec, ...]:
        return objective_specs(self.meta["objectives"])

    @property
    def runs(self) -> int:
        """Measurements per configuration."""
        return int(self.meta["runs"])

    def row(self, candidate: Candidate) -> GridRow:
        try:
            return self._by_key[candidate_key(candidate)]
        except KeyError:
            raise TableError(f"{self.name}: no row for {candidate.label()}") from None

    def with_row(self, row: GridRow) -> GridTable:
        """This table with ``row`` added or replaced (rows stay in the order they were first measured)."""
        key = candidate_key(row.candidate)
        rows = [row if candidate_key(r.candidate) == key else r for r in self.rows]
        if key not in self._by_key:
            rows.append(row)
        return GridTable(self.meta, tuple(rows))

    def with_meta(self, **changes: Any) -> GridTable:
        return GridTable({**self.meta, **changes}, self.rows)

    def complete(self, candidates: Sequence[Candidate]) -> bool:
        """Every candidate has a row with every run."""
        return all(candidate_key(c) in self._by_key and len(self._by_key[candidate_key(c)].runs) >= self.runs
                   for c in candidates)

    def truly_feasible(self, row: GridRow) -> bool:
        """The row's mean figures meet every SLO of the class (a figure a run lacks breaks its SLO)."""
        return all(r.met for r in slo_results(SloConfig(**self.meta["slo"]), row.truth()))

    def true_value(self, candidate: Candidate) -> float | None:
        """The first objective's mean over the runs (None when a run failed)."""
        return self.row(candidate).truth().get(self.specs[0].figure)

    def optimum(self) -> tuple[GridRow, float]:
        """The best truly feasible configuration by its true first objective; TableError when none is."""
        spec = self.specs[0]
        best: tuple[GridRow, float] | None = None
        for row in self.rows:
            value = row.truth().get(spec.figure)
            if value is None or not self.truly_feasible(row):
                continue
            if best is None or spec.better(value, best[1]):
                best = (row, value)
        if best is None:
            raise TableError(f"{self.name}: no configuration meets every SLO on its mean figures")
        return best

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.meta, "rows": [r.as_dict() for r in self.rows]}

    def save(self, path: str | Path) -> None:
        """Write the table as JSON (to a temporary file first, so a crash never leaves half a table)."""
        path = Path(path)
        scratch = path.with_suffix(path.suffix + ".tmp")
        scratch.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        os.replace(scratch, path)

    @classmethod
    def load(cls, path: str | Path) -> GridTable:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise TableError(f"{path}: not a grid table of format {FORMAT!r}")
        rows = tuple(GridRow.from_dict(r) for r in data.pop("rows"))
        data.pop("format")
        return cls(data, rows)


class TableRunner:
    """A trial runner that measures by looking up: run ``n`` of a configuration is its stored run
    ``(offset + n) % runs``, the offset drawn per configuration from ``seed``. Counts what it was asked."""

    def __init__(self, table: GridTable, *, seed: int) -> None:
        self._table = table
        self._seed = seed
        self.deployments = 0

    def stored_run(self, candidate: Candidate, run: int) -> TrialRecord:
        row = self._table.row(candidate)
        digest = hashlib.sha256(f"{self._seed}:{candidate.label()}".encode()).digest()
        return row.runs[(digest[0] + run) % len(row.runs)]

    async def run(self, candidate: Candidate, *, number: int, run: int = 0) -> Measurement:
        self.deployments += 1
        stored = self.stored_run(candidate, run)
        source = stored.source or "table"
        if stored.outcome == "failed" or stored.measured is None:
            return Measurement(pool_id=f"table-{number}", route=f"trial-table-{number}", source=source,
                               failure=stored.reason or "failed when the grid was measured")
        wall = replace(stored.measured, clock="wall")  # engine-clock figures on a clock that ran at 1x
        return Measurement(pool_id=f"table-{number}", route=f"trial-table-{number}", source=source, wall=wall,
                           clock=real_clock(), timings=dict(stored.timings))

    async def close(self) -> None:
        """Nothing was deployed."""
