"""Drive a workload profile against a host with locust and summarize TTFT, TPOT and throughput.

Bounded: the run ends after the profile's warm-up + duration or at its request cap, targets only the host
given (loopback unless --allow-remote), and is killed if it overruns. Progress goes to stderr, the summary
table to stdout, the summary JSON to --json.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from gateway.errors import UserError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str, *, flag: str = "--duration", allow_zero: bool = False) -> float:
    """Seconds in ``90``, ``60s``, ``2m``, ``1m30s``, ``1.5h`` or ``500ms``; raises UserError otherwise."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            raise UserError(f"{flag} {text!r}: expected seconds or a duration like 60s, 2m, 1m30s") from None
        seconds = sum(float(number) * _SECONDS_PER_UNIT[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise UserError(f"{flag} {text!r}: must be {'zero or more' if allow_zero else 'positive'}")
    return seconds


def _parse_warmup_s(text: str) -> float:
    return parse_duration_s(text, flag="--warmup", allow_zero=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True,
                        help="shipped profile (interactive, batch, long-context, sharegpt-like) or a YAML path")
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="base URL of the gateway or engine")
    parser.add_argument("--duration", type=parse_duration_s, help="measured window, e.g. 60s (profile default)")
    parser.add_argument("--warmup", type=_parse_warmup_s, help="warm-up before the window (profile default)")
    parser.add_argument("--users", type=int, help="concurrent users (profile default)")
    parser.add_argument("--max-requests", type=int, help="request cap, warm-up included (profile default)")
    parser.add_argument("--model", help="model to ask for (default: the profile's, else the first listed)")
    parser.add_argument("--api-key", default=os.environ.get("TPGATE_API_KEY"),
                        help="bearer token for the target (default: $TPGATE_API_KEY)")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON here")
    parser.add_argument("--records", metavar="PATH", help="keep the per-request records (JSON lines) here")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from loadtests import LoadRunError, LoadTestInputError, format_table, run_load  # locust-free, but not light

    try:
        summary = run_load(
            args.profile,
            args.host,
            duration_s=args.duration,
            warmup_s=args.warmup,
            users=args.users,
            max_requests=args.max_requests,
            model=args.model,
            api_key=args.api_key,
            json_path=args.json,
            records_path=args.records,
            allow_remote=args.allow_remote,
            progress=None if args.quiet else sys.stderr,
        )
    except LoadTestInputError as exc:
        raise UserError(str(exc)) from None
    except LoadRunError as exc:
        print(f"tpgate: load test failed: {exc}", file=sys.stderr)
        return 1
    print(format_table(summary))
    return 0
