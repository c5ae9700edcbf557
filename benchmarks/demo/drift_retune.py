"""`make demo-drift`: the closed loop on simulated engines — drift detected, the class re-tuned and promoted.

1. Start `tpgate serve` on `benchmarks/demo/tpgate-drift.yaml` (Llama-3-8B on 4 simulated H100s; class batch on
   one TP 2 pool with batches of 8, what it was tuned for: a few users with long prompts) and `tpgate drift`
   beside it (batch in mode auto).
2. Put the tuned-for load on it: 2 users with 3,000-token prompts ("before").
3. Shift the load: 64 users with 200-token prompts. The monitor sees the drift over its window, re-tunes batch on
   the 2 GPUs production leaves free with the live profile as the load (the current TP 2 measured first), and
   promotes the winner in stages when it is better by the margin ("during" until the promotion has finished).
4. Measure "after", print SLO attainment and throughput per phase, and write `benchmarks/demo/drift-demo.html`
   (self-contained: inline SVG, no scripts) with the series every few seconds.

Throughput is in the engines' clock (output tokens per second / time scale). Run it with `make demo-drift`
(about six minutes on a 2-core machine).
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import yaml
from online_tuning import Gateway, StopSignal, describe_route, say

from gateway.exposition import Samples, summed_increase
from loadtests import load_profile, run_load
from tuner.timescale import wall_profile

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "tpgate-drift.yaml"
OUT_HTML = HERE / "drift-demo.html"
CLASS = "batch"
SAMPLE_S = 5.0
BEFORE_S = 40.0
AFTER_S = 40.0
RETUNE_TIMEOUT_S = 600.0
LOAD_S = 3600.0  # each load runs until the demo stops it
RETUNE_ENDED = re.compile(r": re-tune (promoted|kept|rolled_back|failed): ")

PROFILES = {
    "tuned-for": {"description": "2 users, 3,000-token prompts", "users": 2,
                  "arrival": {"kind": "closed", "think_time_s": {"kind": "fixed", "value": 0.5}},
                  "prompt_tokens": {"kind": "fixed", "value": 3000}, "output_tokens": {"kind": "fixed", "value": 64}},
    "shifted": {"description": "64 users, 200-token prompts", "users": 64, "spawn_rate_per_s": 64,
                "arrival": {"kind": "closed", "think_time_s": {"kind": "fixed", "value": 0.2}},
                "prompt_tokens": {"kind": "fixed", "value": 200}, "output_tokens": {"kind": "fixed", "value": 32}},
}


@dataclass(frozen=True)
class Point:
    """One sample interval of the class (engine clock for throughput)."""

    at_s: float
    phase: str
    configuration: str
    requests: float
    failed: float
    slo_attainment: float | None
    output_tokens_per_s: float


def profile_file(workdir: Path, name: str) -> Path:
    data = {**PROFILES[name], "stream": True, "api": "chat", "workload_class": {"name": CLASS, "via": "header"},
            "duration_s": 60, "max_requests": 1_000_000, "request_timeout_s": 120, "drain_timeout_s": 30}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Load:
    """One profile against the gateway in the background until :meth:`stop`; counts failed requests."""

    def __init__(self, gateway: Gateway, path: Path, scale: float) -> None:
        self.stop_signal = StopSignal()
        profile = wall_profile(load_profile(str(path)), scale, warmup_s=0, duration_s=LOAD_S, route=CLASS)

        def run() -> None:
            try:
                run_load(profile, gateway.url, progress=cast(TextIO, self.stop_signal))
            except Exception as exc:  # the stop signal ends the run with an error; anything else is said
                if not self.stop_signal.stopped.is_set():
                    say(f"load stopped early: {exc}")

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_signal.stopped.set()
        self.thread.join(timeout=60)


def point(start: Samples, end: Samples, *, at_s: float, phase: str, configuration: str, window_s: float,
          scale: float) -> Point:
    def of_class(labels: dict[str, str]) -> bool:
        return labels.get("class") == CLASS

    def ok(labels: dict[str, str]) -> bool:
        return of_class(labels) and labels.get("status", "").startswith("2")

    requests = summed_increase([start], [end], "tpgate_requests_total", of_class) or 0.0
    succeeded = summed_increase([start], [end], "tpgate_requests_total", ok) or 0.0
    met = summed_increase([start], [end], "tpgate_slo_met_requests_total", of_class) or 0.0
    tokens = summed_increase([start], [end], "tpgate_output_tokens_total", of_class) or 0.0
    return Point(at_s=at_s, phase=phase, configuration=configuration, requests=requests, failed=requests - succeeded,
                 slo_attainment=met / succeeded if succeeded else None,
                 output_tokens_per_s=tokens / window_s / scale)


def summary_rows(points: list[Point]) -> list[tuple[str, str, float, float, float | None, float]]:
    rows = []
    for phase in ("before", "during", "after"):
        chosen = [p for p in points if p.phase == phase]
        if not chosen:
            continue
        requests = sum(p.requests for p in chosen)
        met = sum((p.slo_attainment or 0.0) * (p.requests - p.failed) for p in chosen)
        ok = sum(p.requests - p.failed for p in chosen)
        configurations = " / ".join(dict.fromkeys(p.configuration for p in chosen))
        rows.append((phase, configurations, requests, sum(p.failed for p in chosen), met / ok if ok else None,
                     sum(p.output_tokens_per_s for p in chosen) / len(chosen)))
    return rows


def table(rows: list[tuple[str, str, float, float, float | None, float]]) -> str:
    lines = ["| phase | configuration | requests | failed | SLO attainment | output tokens/s |",
             "|---|---|---|---|---|---|"]
    for phase, configuration, requests, failed, attainment, tokens in rows:
        shown = "n/a" if attainment is None else f"{attainment:.1%}"
        lines.append(f"| {phase} | {configuration} | {requests:,.0f} | {failed:,.0f} | {shown} | {tokens:,.0f} |")
    return "\n".join(lines)


def svg_series(points: list[Point], value: Any, label: str, *, width: int = 760, height: int = 220) -> str:
    """A line chart of ``value(point)`` over time, phases shaded, as inline SVG."""
    values = [(p.at_s, value(p)) for p in points if value(p) is not None]
    if not values:
        return ""
    t_max = max(t for t, _ in values) or 1.0
    v_max = max(v for _, v in values) * 1.1 or 1.0
    pad = 40

    def x(t: float) -> float:
        return pad + (width - 2 * pad) * t / t_max

    def y(v: float) -> float:
        return height - pad - (height - 2 * pad) * v / v_max

    colours = {"before": "#e8f0fe", "during": "#fdecea", "after": "#e6f4ea"}
    shading = []
    for phase, colour in colours.items():
        times = [p.at_s for p in points if p.phase == phase]
        if times:
            left, right = x(min(times) - SAMPLE_S), x(max(times))
            shading.append(f'<rect x="{left:.1f}" y="{pad}" width="{max(right - left, 1):.1f}" '
                           f'height="{height - 2 * pad}" fill="{colour}"/><text x="{left + 4:.1f}" y="{pad + 14}" '
                           f'font-size="11">{phase}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(t):.1f},{y(v):.1f}" for i, (t, v) in enumerate(values))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
            + "".join(shading)
            + f'<path d="{path}" fill="none" stroke="#1a73e8" stroke-width="2"/>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#555"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#555"/>'
            f'<text x="{pad}" y="{pad - 8}" font-size="12">{html.escape(label)} (max {v_max / 1.1:,.3g})</text>'
            f'<text x="{width - pad}" y="{height - pad + 16}" font-size="11" text-anchor="end">'
            f'{t_max:.0f} s</text></svg>')


def write_html(path: Path, points: list[Point], rows: list[Any], monitor_lines: list[str]) -> None:
    ended = next((m.group(1) for line in monitor_lines if (m := RETUNE_ENDED.search(line))), None)
    headline = {"promoted": "drift detected, class re-tuned and promoted", "kept": "drift detected, re-tune kept "
                "the current configuration", "rolled_back": "drift detected, re-tuned, the promotion rolled back",
                "failed": "drift detected, the re-tune failed"}.get(ended or "", "no re-tune ended")
    body = [
        f"<h1>tpgate: {headline}</h1>",
        f"<pre>{html.escape(table(rows))}</pre>",
        svg_series(points, lambda p: p.output_tokens_per_s, "output tokens/s (engine clock)"),
        svg_series(points, lambda p: p.slo_attainment, "SLO attainment"),
        "<h2>tpgate drift</h2>", f"<pre>{html.escape(chr(10).join(monitor_lines))}</pre>",
    ]
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>tpgate drift demo</title></head>"
                    "<body style='font-family:sans-serif;max-width:900px'>" + "\n".join(body) + "</body></html>")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tpgate-drift-demo-"))
    config = yaml.safe_load(CONFIG.read_text())
    config["classes"][CLASS]["profile"] = str(profile_file(workdir, "tuned-for"))
    shifted = profile_file(workdir, "shifted")
    config["state_file"] = str(workdir / "state.json")
    config["auth"] = {"admin_token_file": str(workdir / "admin-token")}
    config["drift"]["reference_file"] = str(workdir / "drift.json")
    scale = float(config["engine"]["time_scale"])
    gateway = Gateway(workdir, config)
    say(f"starting tpgate serve on {gateway.url} ({config['model']}, {config['gpus']} simulated {config['gpu']}, "
        f"engine clock x{scale:g}); work files in {workdir}")
    gateway.start()
    monitor_log = workdir / "drift.log"
    monitor: subprocess.Popen[bytes] | None = None
    loads: list[Load] = []
    points: list[Point] = []
    started = time.monotonic()
    try:
        with open(monitor_log, "w") as log:
            monitor = subprocess.Popen([sys.executable, "-m", "gateway.cli", "drift", "--config",
                                        str(workdir / "tpgate.yaml"), "--gateway", gateway.url],
                                       stdout=log, stderr=subprocess.STDOUT)
        say(f"load: {PROFILES['tuned-for']['description']} (what batch was tuned for)")
        loads.append(Load(gateway, workdir / "tuned-for.yaml", scale))
        phase = "before"
        previous = gateway.scrape()
        shifted_at: float | None = None
        ended_at: float | None = None
        seen = 0
        while True:
            time.sleep(SAMPLE_S)
            now = gateway.scrape()
            state = gateway.api.get("/admin/state")
            at_s = time.monotonic() - started
            points.append(point(previous, now, at_s=at_s, phase=phase, configuration=describe_route(state, CLASS),
                                window_s=SAMPLE_S, scale=scale))
            previous = now
            lines = monitor_log.read_text().splitlines()
            for line in lines[seen:]:
                say(line)
            seen = len(lines)
            if phase == "before" and at_s >= BEFORE_S:
                say(f"load shifts: {PROFILES['shifted']['description']}")
                loads.pop().stop()
                loads.append(Load(gateway, shifted, scale))
                phase, shifted_at = "during", at_s
            elif phase == "during" and any(RETUNE_ENDED.search(line) for line in lines):
                phase, ended_at = "after", at_s
            elif phase == "during" and shifted_at is not None and at_s - shifted_at > RETUNE_TIMEOUT_S:
                say("no re-tune ended in time")
                break
            elif phase == "after" and ended_at is not None and at_s - ended_at >= AFTER_S:
                break
        rows = summary_rows(points)
        print(table(rows), flush=True)
        write_html(OUT_HTML, points, rows, monitor_log.read_text().splitlines())
        say(f"wrote {OUT_HTML.resolve()}")
    finally:
        for load in loads:
            load.stop()
        if monitor is not None and monitor.poll() is None:
            monitor.terminate()
            monitor.wait(timeout=30)
        gateway.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
