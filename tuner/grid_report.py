"""A measured grid table in Markdown (pure): one line per configuration, the grid's best first, with every run's
objective figure, their mean, the mean of each latency SLO's figure, whether the means meet every SLO, the worst
run's clock lag and the performance model's prediction. docs/tuner.md shows these tables."""

from __future__ import annotations

from gateway.config import SloConfig
from tuner.objectives import SLO_FIGURES, slo_names
from tuner.records import TrialRecord
from tuner.tabular import GridRow, GridTable


def markdown_table(table: GridTable) -> str:
    spec = table.specs[0]
    latency_slos = [SLO_FIGURES[name] for name in slo_names(SloConfig(**table.meta["slo"]))
                    if name != "error_rate_max" and SLO_FIGURES[name][0] != spec.figure]
    header = ["configuration", f"{spec.label} per run", "mean", *(label for _, label in latency_slos),
              "SLOs met", "clock lag, worst run", f"predicted {spec.label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _ranked(table):
        truth = row.truth()
        cells = [
            row.candidate.label(),
            " / ".join(_run_value(run, spec.figure) for run in row.runs),
            _figure(spec.figure, truth.get(spec.figure)),
            *(_figure(figure, truth.get(figure)) for figure, _ in latency_slos),
            "yes" if table.truly_feasible(row) else "no",
            _worst_lag(row),
            _figure(spec.figure, (row.runs[0].predicted or {}).get(spec.figure) if row.runs else None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ranked(table: GridTable) -> list[GridRow]:
    """Truly feasible rows first, then the others, each best first by the mean objective; failed rows last."""
    spec = table.specs[0]
    sign = 1 if spec.direction == "minimize" else -1

    def key(row: GridRow) -> tuple[int, int, float]:
        value = row.truth().get(spec.figure)
        return (value is None, not table.truly_feasible(row), sign * value if value is not None else 0.0)

    return sorted(table.rows, key=key)


def _run_value(run: TrialRecord, figure: str) -> str:
    if run.outcome == "failed" or run.measured is None:
        return "failed"
    return _figure(figure, getattr(run.measured, figure))


def _worst_lag(row: GridRow) -> str:
    lags = [run.clock.lag_ratio for run in row.runs if run.clock is not None]
    return f"{round(max(lags), 3) or 0.0:.1%}" if lags else "n/a"  # no "-0.0%" for a clock a hair fast


def _figure(figure: str, value: float | None) -> str:
    """Seconds with two decimals, TPOT in milliseconds, rates as whole numbers."""
    if value is None:
        return "n/a"
    if figure.endswith("_per_s"):
        return f"{value:,.0f}"
    if figure.startswith("tpot"):
        return f"{value * 1000:.0f} ms"
    if figure == "error_rate":
        return f"{value:.2%}"
    return f"{value:.2f} s"
