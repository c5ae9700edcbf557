"""Operate a running gateway through its admin API: state, pools, routes, tuning, promotion, rollback.

Every verb is one call (or a few, with ``--wait``) to ``/admin/...`` on the gateway, with the admin token read
from the token file (``--token-file``, default the configuration's ``auth.admin_token_file``). A refusal prints
the gateway's reason on one line and exits with status 2; ``--wait`` on ``promote`` and ``rollback`` exits with 1
when the promotion rolled back.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from gateway.commands.load import parse_duration_s
from gateway.config import load_config
from gateway.errors import UserError

HTTP_TIMEOUT_S = 150.0
WAIT_POLL_S = 2.0
TERMINAL = ("succeeded", "rolled_back")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="tpgate YAML configuration (for the URL and the token file)")
    parser.add_argument("--url", help="the gateway (default: http://<server.host>:<server.port>)")
    parser.add_argument("--token-file", help="the admin token file (default: auth.admin_token_file)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("state", help="pools, routes, GPU budget, promotions, studies, recent events")
    verbs.add_parser("pools", help="every pool")
    add = verbs.add_parser("add-pool", help="deploy a pool (or resize one)")
    add.add_argument("pool_id", metavar="ID")
    add.add_argument("--tp", type=int, required=True)
    add.add_argument("--replicas", type=int, default=1)
    add.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                     help="an engine knob, e.g. max_batch_size=256 (repeatable)")
    remove = verbs.add_parser("remove-pool", help="take a pool out of every route, drain it, delete it")
    remove.add_argument("pool_id", metavar="ID")
    route = verbs.add_parser("route", help="set a class's weights: route batch pool-a=0.8 pool-b=0.2")
    route.add_argument("class_name", metavar="CLASS")
    route.add_argument("weights", nargs="+", metavar="POOL=WEIGHT")
    tune = verbs.add_parser("tune", help="start an online study of a class")
    tune.add_argument("--class", dest="class_name", required=True, metavar="CLASS")
    tune.add_argument("--trials", type=int, default=6)
    tune.add_argument("--timeout", type=lambda text: parse_duration_s(text, flag="--timeout"), metavar="DURATION")
    tune.add_argument("--max-gpus", type=int)
    tune.add_argument("--warmup", type=lambda text: parse_duration_s(text, flag="--warmup"), metavar="DURATION")
    tune.add_argument("--window", type=lambda text: parse_duration_s(text, flag="--window"), metavar="DURATION")
    tune.add_argument("--seed", type=int)
    tune.add_argument("--profile", metavar="FILE",
                      help="tune with this load profile (YAML, as for tpgate load) instead of the class's own")
    tune.add_argument("--wait", action="store_true", help="follow the study until it ends")
    study = verbs.add_parser("study", help="a study's progress, trials and best so far")
    study.add_argument("study_id", metavar="STUDY")
    study.add_argument("--wait", action="store_true", help="follow the study until it ends")
    stop = verbs.add_parser("stop", help="stop a study")
    stop.add_argument("study_id", metavar="STUDY")
    report = verbs.add_parser("report", help="save a study's HTML report")
    report.add_argument("study_id", metavar="STUDY")
    report.add_argument("--out", required=True, metavar="PATH")
    promote = verbs.add_parser("promote", help="promote a study's winner (staged, SLO-guarded)")
    promote.add_argument("study_id", metavar="STUDY")
    promote.add_argument("--trial", type=int, help="promote this feasible trial instead of the winner")
    promote.add_argument("--wait", action="store_true", help="follow the promotion until it ends")
    promotion = verbs.add_parser("promotion", help="a promotion's phase, step and verdicts")
    promotion.add_argument("promotion_id", metavar="PROMOTION")
    promotion.add_argument("--wait", action="store_true", help="follow the promotion until it ends")
    abort = verbs.add_parser("abort", help="abort a promotion (old weights at once)")
    abort.add_argument("promotion_id", metavar="PROMOTION")
    rollback = verbs.add_parser("rollback", help="roll a class back (abort its promotion, or undo the last one)")
    rollback.add_argument("class_name", metavar="CLASS")
    rollback.add_argument("--wait", action="store_true", help="follow the rollback until it ends")


def run(args: argparse.Namespace) -> int:
    api = AdminApi.from_args(args)
    verb = args.verb
    if verb == "state":
        return _show(args, api.get("/admin/state"), format_state)
    if verb == "pools":
        return _show(args, api.get("/admin/pools"), lambda pools: "\n".join(_pool_line(p) for p in pools))
    if verb == "add-pool":
        body = {"id": args.pool_id, "tp": args.tp, "replicas": args.replicas, "knobs": _knobs(args.knob)}
        return _show(args, api.call("POST", "/admin/pools", body), lambda r: f"pool {r['id']}: state v{r['version']}")
    if verb == "remove-pool":
        return _show(args, api.call("DELETE", f"/admin/pools/{args.pool_id}"),
                     lambda r: f"pool {r['id']}: draining (state v{r['version']})")
    if verb == "route":
        weights = _weights(args.weights)
        return _show(args, api.call("PUT", f"/admin/routes/{args.class_name}", {"weights": weights}),
                     lambda r: f"class {r['route']}: {_describe(r['weights'])} (state v{r['version']})")
    if verb == "tune":
        body = {"class": args.class_name, "trials": args.trials, "timeout_s": args.timeout, "max_gpus": args.max_gpus,
                "warmup_s": args.warmup, "window_s": args.window, "seed": args.seed,
                "profile": None if args.profile is None else _profile_fields(args.profile)}
        started = api.call("POST", "/admin/tuning", {k: v for k, v in body.items() if v is not None})
        _show(args, started, lambda s: f"study {s['id']}: class {s['class']} on up to {s['gpus']} GPUs, "
                                       f"{s['trials']} trials")
        return _follow_study(api, started["id"]) if args.wait else 0
    if verb == "study":
        if args.wait:
            return _follow_study(api, args.study_id)
        return _show(args, api.get(f"/admin/tuning/{args.study_id}"), format_study)
    if verb == "stop":
        return _show(args, api.call("POST", f"/admin/tuning/{args.study_id}/stop"),
                     lambda s: f"study {s['id']}: {s['state']}")
    if verb == "report":
        Path(args.out).write_text(api.text(f"/admin/tuning/{args.study_id}/report"))
        print(f"wrote {args.out}")
        return 0
    if verb == "promote":
        body = {} if args.trial is None else {"trial": args.trial}
        promotion = api.call("POST", f"/admin/tuning/{args.study_id}/promote", body)
        _show(args, promotion, format_promotion)
        return _follow_promotion(api, promotion["id"]) if args.wait else 0
    if verb == "promotion":
        if args.wait:
            return _follow_promotion(api, args.promotion_id)
        return _show(args, api.get(f"/admin/promotions/{args.promotion_id}"), format_promotion)
    if verb == "abort":
        return _show(args, api.call("POST", f"/admin/promotions/{args.promotion_id}/abort"), format_promotion)
    if verb == "rollback":
        promotion = api.call("POST", f"/admin/routes/{args.class_name}/rollback")
        _show(args, promotion, format_promotion)
        return _follow_promotion(api, promotion["id"]) if args.wait else 0
    raise UserError(f"unknown verb {verb!r}")


class AdminApi:
    """The admin API of one gateway, with its token (blocking HTTP: a CLI makes one call at a time)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._token = token

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminApi:
        config = load_config(args.config, environ=os.environ)
        url = args.url or f"http://{config.server.host}:{config.server.port}"
        token_path = Path(args.token_file or config.auth.admin_token_file).expanduser()
        try:
            token = token_path.read_text().strip()
        except OSError as exc:
            raise UserError(f"{token_path}: cannot read the admin token ({exc.strerror}); pass --token-file") from None
        return cls(url, token)

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def text(self, path: str) -> str:
        return self._request("GET", path, None).decode()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._request(method, path, body))

    def _request(self, method: str, path: str, body: Any) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._token}", "content-type": "application/json"}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise UserError(f"{method} {path}: HTTP {exc.code}: {_reason(exc.read())}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"no gateway answers at {self.url} ({reason}); is tpgate serve running?") from None


def _reason(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


def _show(args: argparse.Namespace, answer: Any, text: Any) -> int:
    print(json.dumps(answer, indent=2) if args.json else text(answer), flush=True)
    return 0


def _profile_fields(path: str) -> dict[str, Any]:
    """A load profile file's fields (the gateway validates them)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"--profile {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--profile {path}: not a YAML mapping of profile fields")
    return data


def _knobs(items: list[str]) -> dict[str, Any]:
    knobs: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--knob {item!r}: expected NAME=VALUE")
        knobs[name] = json.loads(value) if value.replace(".", "", 1).isdigit() else value
    return knobs


def _weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        pool, sep, value = item.partition("=")
        try:
            weights[pool] = float(value)
        except ValueError:
            raise UserError(f"{item!r}: expected POOL=WEIGHT, e.g. batch-tp2=0.5") from None
        if not sep:
            raise UserError(f"{item!r}: expected POOL=WEIGHT, e.g. batch-tp2=0.5")
    return weights


def _follow_study(api: AdminApi, study_id: str) -> int:
    """Print the study's progress lines as they come (each line once) until it ends."""
    printed: set[str] = set()
    while True:
        study = api.get(f"/admin/tuning/{study_id}")
        for line in study["progress"]:
            if line not in printed:
                printed.add(line)
                print(f"  {line}", flush=True)
        if study["state"] != "running":
            print(format_study(study), flush=True)
            return 0 if study["state"] == "completed" and study.get("best") else 1
        time.sleep(WAIT_POLL_S)


def _follow_promotion(api: AdminApi, promotion_id: str) -> int:
    last = ""
    while True:
        promotion = api.get(f"/admin/promotions/{promotion_id}")
        line = format_promotion(promotion)
        if line != last:
            print(line, flush=True)
            last = line
        if promotion["phase"] in TERMINAL:
            return 0 if promotion["phase"] == "succeeded" else 1
        time.sleep(WAIT_POLL_S)


# --- formatting ----------------------------------------------------------------------------------------------


def format_state(state: dict[str, Any]) -> str:
    gpus = state["gpus"]
    lines = [f"state v{state['version']}: {state['model']}, GPUs {gpus['used']}/{gpus['budget']} used, "
             f"{gpus['free']} free"]
    lines += [f"  pool {_pool_line(p)}" for p in state["pools"].values()]
    lines += [f"  class {name}: {_describe(weights)}" for name, weights in state["routes"].items()]
    lines += [f"  trial route {name} ({r['class']}): {_describe(r['weights'])}"
              for name, r in state["trial_routes"].items()]
    lines += [f"  {format_promotion(p)}" for p in state["promotions"] if p["phase"] not in TERMINAL]
    lines += [f"  study {s['id']}: {s['state']}, {s['measured_trials']}/{s['trials']} trials" for s in state["studies"]
              if s["state"] == "running"]
    return "\n".join(lines)


def format_study(study: dict[str, Any]) -> str:
    best = study.get("best")
    winner = f"best #{best['number']} {best['label']}" if best else "no feasible configuration yet"
    return (f"study {study['id']}: {study['state']}, {study['measured_trials']}/{study['trials']} trials on up to "
            f"{study['gpus']} GPUs; {winner}" + (f" ({study['reason']})" if study.get("reason") else ""))


def format_promotion(p: dict[str, Any]) -> str:
    steps = p["policy"]["steps"]
    where = (f"step {p['step'] + 1}/{len(steps)}, {p['weight']:.0%} on {p['candidate']['id']}"
             if p["phase"] == "shifting" else p["phase"])
    verdict = p.get("last_verdict") or {}
    detail = f"; {verdict['kind']}: {verdict['reason']}" if verdict and p["phase"] == "shifting" else ""
    reason = f": {p['reason']}" if p.get("reason") else ""
    return f"promotion {p['id']} ({p['class']}): {where}{detail}{reason}"


def _pool_line(pool: dict[str, Any]) -> str:
    return (f"{pool['id']}: {pool['ready_replicas']}/{pool['replicas']} x tp{pool['tp']} {pool['phase']}"
            + (" (trial)" if pool.get("trial") else ""))


def _describe(weights: dict[str, float]) -> str:
    return ", ".join(f"{pool} {weight:.0%}" for pool, weight in weights.items())
