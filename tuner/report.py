"""``tpgate tune report``: one self-contained HTML page per study (plotly.js embedded; no network fetch).

The page shows the trial history, the Pareto front (several objectives) or the objective per configuration
(one), predicted against measured, each SLO's pass/fail per trial, and a table per measured configuration:
throughput, goodput, TTFT/TPOT/e2e percentiles, error rate, GPUs, and the planner's weights and KV-cache memory
per GPU. Figures are in the engines' clock, as recorded.

The summary also shows the study's rigour: configurations measured again with other load seeds (each run,
and the worst that ranks them: the winner is the best worst run), the rounds of trials measured at once, and
the configurations not deployed because the feasibility model expected them to fail like their neighbours.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs
from sqlalchemy.exc import SQLAlchemyError

from gateway.errors import UserError
from tuner.objectives import ObjectiveSpec, objective_specs
from tuner.progress import format_value
from tuner.records import RECORD_ATTR, TrialRecord
from tuner.standings import best_of, standings
from tuner.study import STUDY_ATTR

GIB = 1024**3
OUTCOME_COLOURS = {"feasible": "#2ca02c", "infeasible": "#ff7f0e", "rejected": "#7f7f7f", "failed": "#d62728",
                   "invalid": "#9467bd", "avoided": "#bcbd22"}


@dataclass(frozen=True)
class StudyReport:
    """What a report shows: the study's identity (class, objectives, SLOs, space) and its trials' records."""

    study_name: str
    storage: str
    identity: Mapping[str, Any]
    records: tuple[TrialRecord, ...]

    @property
    def specs(self) -> tuple[ObjectiveSpec, ...]:
        return objective_specs(self.identity.get("objectives") or ["min_e2e_p99"])

    def measured(self) -> list[TrialRecord]:
        """Trials that deployed and measured something, without repeats."""
        return [r for r in self.records if r.measured is not None and r.reused_from is None]

    @property
    def runs_required(self) -> int:
        """Runs a configuration needed to win: the most any configuration had (1 + re-measurements)."""
        return 1 + max((r.run for r in self.records if r.reused_from is None), default=0)

    def best(self) -> list[TrialRecord]:
        """The winners' representative (worst) runs: configurations rank by their worst run."""
        return best_of(self.records, self.specs, runs_required=self.runs_required)

    def remeasured(self) -> list[str]:
        """``tp2x2 ...: 3.10 s, 3.32 s (worst 3.32 s)`` per configuration measured more than once."""
        spec = self.specs[0]
        lines = []
        for standing in standings(self.records):
            if len(standing.runs) < 2:
                continue
            values = ", ".join(format_value(spec, _measured(r, spec)) if r.outcome != "failed" else "failed"
                               for r in standing.runs)
            worst = (format_value(spec, standing.worst(self.specs)[0]) if standing.feasible
                     else "breaks an SLO or failed")
            lines.append(f"{standing.candidate.label()}: {values} (worst {worst})")
        return lines

    def rounds(self) -> str:
        """``4 rounds for 6 trials, up to 2 at once`` (trials measured one at a time: ``one at a time``)."""
        by_round: dict[int, int] = {}
        for r in self.records:
            if r.parallel_round is not None and r.reused_from is None and r.outcome not in ("rejected", "avoided"):
                by_round[r.parallel_round] = by_round.get(r.parallel_round, 0) + 1
        if not by_round or max(by_round.values()) == 1:
            return "one at a time"
        return (f"{len(by_round)} rounds for {sum(by_round.values())} trials, up to {max(by_round.values())} "
                "at once")

    def avoided(self) -> list[str]:
        """``#7 tp8x1 ...: predicted to fail (p 0.67: near failed trials #4, #6)`` per avoided configuration."""
        return [f"#{r.number} {r.candidate.label()}: {r.reason}" for r in self.records if r.outcome == "avoided"]


def load_report(storage: str, study_name: str | None = None) -> StudyReport:
    """Read a study's records from Optuna storage; UserError for a missing study (naming those present)."""
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except (SQLAlchemyError, ImportError) as exc:  # a bad URL or file; a database driver not installed
        raise UserError(f"cannot open storage {storage!r}: {str(exc).splitlines()[0]}") from None
    if study_name is None:
        if len(names) != 1:
            raise UserError(f"storage {storage!r} holds {len(names)} studies; name one with --study-name "
                            f"({', '.join(names) or 'none'})")
        study_name = names[0]
    if study_name not in names:
        raise UserError(f"no study {study_name!r} in {storage!r} (studies: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    records = tuple(TrialRecord.from_attrs(t.user_attrs) for t in trials if RECORD_ATTR in t.user_attrs)
    return StudyReport(study_name, storage, study.user_attrs.get(STUDY_ATTR, {}), records)


def render_report(report: StudyReport) -> str:
    """The whole HTML page."""
    figures = [history_figure(report, spec) for spec in report.specs]
    figures.append(pareto_figure(report) if len(report.specs) > 1 else configuration_figure(report))
    figures += [prediction_figure(report, spec) for spec in report.specs]
    if any(r.slo for r in report.measured()):
        figures.append(slo_figure(report))
    plots = "\n".join(f'<section class="plot">{f.to_html(full_html=False, include_plotlyjs=False)}</section>'
                      for f in figures)
    title = f"tpgate tune: {report.identity.get('space', {}).get('class', '?')} ({report.study_name})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f3f3f3; }} td.text {{ text-align: left; }}
.plot {{ margin: 1.5em 0; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
{summary_html(report)}
{plots}
<h2>Measured configurations</h2>
{table_html(report)}
</body></html>
"""


def summary_html(report: StudyReport) -> str:
    identity = report.identity
    space = identity.get("space", {})
    slo = ", ".join(f"{k} {v}" for k, v in (identity.get("slo") or {}).items() if v is not None) or "none"
    best = report.best()
    winner = "; ".join(f"#{r.number} {r.candidate.label()}" for r in best) or "none met every SLO yet"
    if best and report.runs_required > 1:
        winner += f" (ranked by the worst of {report.runs_required} runs, each with another load seed)"
    counts: dict[str, int] = {}
    for r in report.records:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    sources = sorted({r.source for r in report.records if r.source})
    rows = [
        ("study", f"{report.study_name} in {report.storage}"),
        ("model and GPUs", f"{space.get('model')} on {space.get('gpus')} x {space.get('gpu')} "
                           f"(TP sizes {space.get('tp_sizes')}, replicas {space.get('replicas')})"),
        ("objectives", ", ".join(s.name for s in report.specs)),
        ("SLOs", slo),
        ("trials", ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "none"),
        ("measured by", ", ".join(sources) or "-"),
        ("winner", winner),
        ("measured again", "; ".join(report.remeasured()) or "no configuration"),
        ("trials at once", report.rounds()),
        ("not deployed, predicted to fail", "; ".join(report.avoided()) or "none"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td class='text'>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def history_figure(report: StudyReport, spec: ObjectiveSpec) -> go.Figure:
    """The objective per trial, coloured by outcome, with the best feasible value so far."""
    fig = go.Figure()
    for outcome, colour in OUTCOME_COLOURS.items():
        points = [(r.number, _measured(r, spec), r) for r in report.records if r.outcome == outcome]
        points = [p for p in points if p[1] is not None]
        if points:
            fig.add_trace(go.Scatter(
                x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", name=outcome,
                marker={"color": colour, "size": 9}, text=[p[2].candidate.label() for p in points]))
    best_x, best_y, best = [], [], None
    for r in report.records:
        value = _measured(r, spec)
        if r.outcome == "feasible" and value is not None and (best is None or spec.better(value, best)):
            best = value
        if best is not None:
            best_x.append(r.number)
            best_y.append(best)
    fig.add_trace(go.Scatter(x=best_x, y=best_y, mode="lines", name="best feasible", line={"shape": "hv"}))
    fig.update_layout(title=f"Trial history: {spec.label}", xaxis_title="trial",
                      yaxis_title=f"{spec.label} ({spec.unit})")
    return fig


def configuration_figure(report: StudyReport) -> go.Figure:
    """The objective of each measured configuration, best first."""
    spec = report.specs[0]
    rows = [(r.candidate.label(), value, r.outcome) for r in report.measured()
            if (value := _measured(r, spec)) is not None]
    rows.sort(key=lambda row: row[1] if spec.direction == "minimize" else -row[1])
    fig = go.Figure(go.Bar(x=[row[0] for row in rows], y=[row[1] for row in rows],
                           marker={"color": [OUTCOME_COLOURS[row[2]] for row in rows]}))
    fig.update_layout(title=f"{spec.label} by configuration (green: every SLO met)",
                      yaxis_title=f"{spec.label} ({spec.unit})")
    return fig


def pareto_figure(report: StudyReport) -> go.Figure:
    """The first two objectives of every measured trial, the Pareto front of the feasible ones joined."""
    x_spec, y_spec = report.specs[0], report.specs[1]
    fig = go.Figure()
    for outcome in ("feasible", "infeasible"):
        rows = [r for r in report.measured() if r.outcome == outcome]
        fig.add_trace(go.Scatter(x=[_measured(r, x_spec) for r in rows], y=[_measured(r, y_spec) for r in rows],
                                 mode="markers", name=outcome, text=[r.candidate.label() for r in rows],
                                 marker={"color": OUTCOME_COLOURS[outcome], "size": 9}))
    front = sorted(report.best(), key=lambda r: _measured(r, x_spec) or 0.0)
    fig.add_trace(go.Scatter(x=[_measured(r, x_spec) for r in front], y=[_measured(r, y_spec) for r in front],
                             mode="lines+markers", name="Pareto front", text=[r.candidate.label() for r in front]))
    fig.update_layout(title="Pareto front", xaxis_title=f"{x_spec.label} ({x_spec.unit})",
                      yaxis_title=f"{y_spec.label} ({y_spec.unit})")
    return fig


def prediction_figure(report: StudyReport, spec: ObjectiveSpec) -> go.Figure:
    """Predicted against measured, per measured trial, with the line where they agree."""
    rows = [(r.predicted.get(spec.figure), _measured(r, spec), r) for r in report.measured()]
    rows = [row for row in rows if row[0] is not None and row[1] is not None]
    fig = go.Figure(go.Scatter(x=[row[0] for row in rows], y=[row[1] for row in rows], mode="markers",
                               name="trials", text=[f"#{row[2].number} {row[2].candidate.label()}" for row in rows],
                               marker={"size": 9}))
    values = [v for row in rows for v in row[:2] if isinstance(v, int | float)]
    if values:
        low, high = min(values), max(values)
        fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="measured = predicted",
                                 line={"dash": "dot"}))
    fig.update_layout(title=f"Predicted vs measured: {spec.label}", xaxis_title=f"predicted ({spec.unit})",
                      yaxis_title=f"measured ({spec.unit})")
    return fig


def slo_figure(report: StudyReport) -> go.Figure:
    """Each SLO per measured trial: met, broken, or not measured."""
    measured = [r for r in report.measured() if r.slo]
    names = [s.label for s in measured[0].slo] if measured else []
    z, text = [], []
    for position in range(len(names)):
        row, labels = [], []
        for r in measured:
            result = r.slo[position]
            row.append(0 if result.measured is None else (1 if result.met else -1))
            labels.append("-" if result.measured is None else f"{result.measured:.3g} / {result.limit:g}")
        z.append(row)
        text.append(labels)
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"#{r.number}" for r in measured], y=names, text=text, texttemplate="%{text}",
        zmin=-1, zmax=1, colorscale=[[0, "#d62728"], [0.5, "#cccccc"], [1, "#2ca02c"]], showscale=False))
    fig.update_layout(title="SLOs per trial (green met, red broken; measured / limit)", xaxis_title="trial")
    return fig


def table_html(report: StudyReport) -> str:
    """One row per measured configuration."""
    header = ["trial", "configuration", "outcome", "run", "round", "GPUs", "req/s", "output tok/s", "goodput req/s",
              "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "e2e p50", "e2e p99", "errors",
              "weights/GPU", "KV cache/GPU", "clock", "source"]
    seconds = ObjectiveSpec("", "", "minimize", "", "s")
    rows = []
    for r in report.measured():
        m = r.measured.as_dict() if r.measured is not None else {}

        def rate(name: str, m: Mapping[str, Any] = m) -> str:
            return "-" if m.get(name) is None else f"{m[name]:,.2f}"

        clock = "-" if r.clock is None else f"{r.clock.effective_scale:.3g}x"
        cells = [
            f"#{r.number}", r.candidate.label(), r.outcome,
            "first" if r.remeasure_of is None else f"{r.run + 1} of #{r.remeasure_of}",
            "-" if r.parallel_round is None else str(r.parallel_round), str(r.candidate.gpus),
            rate("requests_per_s"), rate("output_tokens_per_s"), rate("goodput_requests_per_s"),
            *(format_value(seconds, m.get(k)) for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                                                         "e2e_p50_s", "e2e_p99_s")),
            "-" if m.get("error_rate") is None else f"{m['error_rate']:.2%}",
            _gib(r.planner.get("weights_per_gpu_bytes")), _gib(r.planner.get("kv_cache_bytes_per_gpu")),
            clock, r.source or "-",
        ]
        rows.append("<tr>" + "".join(
            f"<td class='text'>{html.escape(c)}</td>" if i in (1, 2, 3, 19) else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>" if rows else "<p>No configuration was measured yet.</p>"


def _measured(record: TrialRecord, spec: ObjectiveSpec) -> float | None:
    if record.measured is None:
        return None
    value = record.measured.as_dict().get(spec.figure)
    return float(value) if value is not None else None


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f} GiB"


def write_report(storage: str, study_name: str | None, out: str) -> StudyReport:
    """Load a study and write its report to ``out``; returns what was reported."""
    report = load_report(storage, study_name)
    with open(out, "w", encoding="utf-8") as stream:
        stream.write(render_report(report))
    return report

