"""Run a workload profile headless and bounded, and return its summary: the entry point for ``tpgate load``
and for the tuner's trials.

Locust runs in a subprocess (it monkey-patches the standard library with gevent, which must not happen in the
caller), in its own process group, under a hard time limit: warm-up + duration + drain + a start-up grace.
While it runs, a progress line goes to ``progress`` every few seconds, computed from the per-request records
the locustfile writes; at the end the same records give the exact summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import yaml

from loadtests.env import API_KEY_ENV
from loadtests.errors import LoadRunError, LoadTestInputError
from loadtests.profile import Profile, load_profile, with_overrides
from loadtests.records import Entry, RecordReader
from loadtests.summary import Summary, progress_line, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
STARTUP_GRACE_S = 30.0  # locust's own start-up and shutdown, on top of the profile's times
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL of the locust process group
LOG_TAIL_CHARS = 2000


def check_host(host: str, *, allow_remote: bool = False) -> str:
    """The base URL to target, without a trailing slash. Only loopback hosts unless ``allow_remote``."""
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadTestInputError(f"host {host!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LoadTestInputError(f"host {host!r} must not have a path: requests go to /v1/... on it")
    if not allow_remote and not _is_loopback(parts.hostname):
        raise LoadTestInputError(
            f"host {parts.hostname!r} is not a loopback address; pass --allow-remote (allow_remote=True) to load it"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _is_loopback(hostname: str) -> bool:
    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False  # a name other than localhost: it could resolve anywhere


def hard_limit_s(profile: Profile) -> float:
    """The longest the locust subprocess may run before it is killed."""
    return profile.run_time_s + profile.drain_timeout_s + STARTUP_GRACE_S


def locust_command(profile: Profile, *, host: str, profile_path: Path, records_path: Path) -> list[str]:
    """argv of the headless locust run for ``profile`` (pure; the API key travels in the environment)."""
    return [
        sys.executable, "-m", "locust",
        "--locustfile", str(LOCUSTFILE),
        "--headless",
        "--host", host,
        "--users", str(profile.users),
        "--spawn-rate", f"{profile.spawn_rate:g}",
        # the locustfile stops the run itself (deadline or cap); this is locust's own backstop
        "--run-time", f"{math.ceil(profile.run_time_s + STARTUP_GRACE_S / 2)}s",
        "--stop-timeout", f"{profile.drain_timeout_s:g}",
        "--only-summary",
        "--exit-code-on-error", "0",
        "--loglevel", "WARNING",
        "--workload-profile", str(profile_path),
        "--records", str(records_path),
    ]


def run_load(
    profile: Profile | str | Path,
    host: str,
    *,
    duration_s: float | None = None,
    warmup_s: float | None = None,
    users: int | None = None,
    max_requests: int | None = None,
    model: str | None = None,
    api_key: str | None = None,
    json_path: str | Path | None = None,
    records_path: str | Path | None = None,
    allow_remote: bool = False,
    progress: TextIO | None = sys.stderr,
    progress_interval_s: float = 2.0,
) -> Summary:
    """Drive ``profile`` (a Profile, a shipped profile name or a YAML path) against ``host`` and summarize it.

    Overrides replace the profile's fields. The run ends after warm-up + duration or at ``max_requests``,
    whichever comes first, and is killed if it outlives :func:`hard_limit_s`. The summary is written to
    ``json_path`` when given; ``records_path`` keeps the per-request JSON lines.

    Raises LoadTestInputError for a bad profile, override or host, and LoadRunError when locust fails or the
    target cannot be used (for example: it lists no model).
    """
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    profile = with_overrides(
        profile, duration_s=duration_s, warmup_s=warmup_s, users=users, max_requests=max_requests, model=model
    )
    host = check_host(host, allow_remote=allow_remote)
    with tempfile.TemporaryDirectory(prefix="tpgate-load-") as scratch:
        workdir = Path(scratch)
        profile_path = workdir / "profile.yaml"
        profile_path.write_text(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
        records = Path(records_path) if records_path is not None else workdir / "records.jsonl"
        records.unlink(missing_ok=True)
        log_path = workdir / "locust.log"
        command = locust_command(profile, host=host, profile_path=profile_path, records_path=records)
        entries, timed_out, returncode = _run_locust(
            command, profile=profile, log_path=log_path, records=records, api_key=api_key,
            progress=progress, progress_interval_s=progress_interval_s,
        )
        log_tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    if returncode not in (0, None) and not entries:
        raise LoadRunError(f"locust exited with status {returncode} before sending a request:\n{log_tail}")
    summary = summarize(entries, profile=profile.name, host=host)
    if timed_out:
        summary = dataclasses.replace(summary, stopped_by="time_limit")
    if summary.stopped_by is not None and summary.stopped_by.startswith("error:"):
        # the reason names the target and the cause: "connection refused at http://127.0.0.1:8000"
        raise LoadRunError(summary.stopped_by.removeprefix("error: "))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


def _run_locust(
    command: list[str],
    *,
    profile: Profile,
    log_path: Path,
    records: Path,
    api_key: str | None,
    progress: TextIO | None,
    progress_interval_s: float,
) -> tuple[list[Entry], bool, int | None]:
    """Run locust to its end or the hard limit; returns (records, whether it was killed, exit status)."""
    env = {**os.environ, API_KEY_ENV: api_key or ""}
    reader = RecordReader(records)
    entries: list[Entry] = []
    started = time.monotonic()
    deadline = started + hard_limit_s(profile)
    timed_out = False
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=progress_interval_s)
                entries += reader.read_new()
                if progress is not None and process.returncode is None:
                    print(progress_line(entries, elapsed_s=time.monotonic() - started), file=progress, flush=True)
                if time.monotonic() > deadline and process.poll() is None:
                    timed_out = True
                    _stop_group(process)
        finally:
            if process.poll() is None:  # interrupted (KeyboardInterrupt): leave nothing running
                _stop_group(process)
    entries += reader.read_new()
    return entries, timed_out, process.returncode


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
