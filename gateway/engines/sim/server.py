"""The simulated engine's HTTP server: LMDeploy 0.18 ``api_server``'s API on aiohttp.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or SSE
streaming), ``GET /health``, ``GET /metrics``, and ``GET /sim/stats`` (the simulator's own: simulated clock
and how fast it really ran, steps, preemptions — what the calibration benchmark reads). Every error a client
sees has the OpenAI shape; a failure after a stream started is sent as a last ``data: {"error": ...}`` event,
then ``data: [DONE]``. Every choice of a request (``n`` > 1 on chat, each prompt of a completion) is its own
sequence in the engine, as in LMDeploy. SIGTERM or SIGINT stops the engine: in-flight requests end with an
error, the port closes, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.engines.sim.clock import Clock, ScaledClock
from gateway.engines.sim.config import SimEngineSetup
from gateway.engines.sim.metrics import EngineMetrics
from gateway.engines.sim.protocol import (
    SSE_DONE,
    ChoiceDelta,
    GenerationRequest,
    ResponseWriter,
    ServingContext,
    check_content_type,
    parse_chat,
    parse_completion,
    sse,
)
from gateway.engines.sim.scheduler import Scheduler, Sequence
from gateway.engines.sim.text import filler_text
from gateway.errors import ERROR_TYPE_BY_STATUS, ApiError, error_body
from gateway.planner.perf import StepCostModel

OWNED_BY = "tpgate-simulator"
# LMDeploy 0.18's AuthenticationMiddleware, and the simulator's own read-only clock statistics (the tuner reads
# them to convert a trial's figures; LMDeploy has no such path)
AUTH_EXEMPT_PREFIXES = ("/health", "/docs", "/redoc", "/nodes", "/sim/")
MAX_BODY_BYTES = 16 * 1024**2

SETUP = web.AppKey("setup", SimEngineSetup)
SCHEDULER = web.AppKey("scheduler", Scheduler)
METRICS = web.AppKey("metrics", EngineMetrics)
CONTEXT = web.AppKey("context", ServingContext)


def build_app(
    setup: SimEngineSetup, *, clock: Clock | None = None, api_keys: tuple[str, ...] = ()
) -> web.Application:
    """The engine as an aiohttp application; the scheduler starts and stops with it. With ``api_keys``, every
    request but those LMDeploy 0.18 exempts needs one of them as its bearer token (:func:`api_key_middleware`)."""
    middlewares: list[Middleware] = [_error_middleware]
    if any(api_keys):
        middlewares.append(api_key_middleware(api_keys))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    metrics = EngineMetrics(
        model_name=setup.served_model_name,
        backend_info={
            "backend": "sim", "model": setup.model.name, "gpu": setup.gpu.name, "tp": str(setup.tp),
            "max_batch_size": str(setup.max_batch_size), "session_len": str(setup.session_len),
            "kv_cache_tokens": str(setup.kv_cache_tokens), "time_scale": f"{setup.time_scale:g}",
        },
    )
    cost = StepCostModel(setup.model, setup.gpu, setup.tp, quant_policy=setup.knobs.quant_policy,
                         deviation=setup.deviation)
    app[SETUP] = setup
    app[METRICS] = metrics
    app[CONTEXT] = ServingContext(
        served_model=setup.served_model_name,
        session_len=setup.session_len,
        vocab_size=setup.model.vocab_size,
        multimodal=setup.model.vision is not None,
        backend=setup.knobs.backend,
    )
    app[SCHEDULER] = Scheduler(cost, clock or ScaledClock(setup.time_scale), setup.limits, observer=metrics)
    app.on_startup.append(_start_scheduler)
    app.on_shutdown.append(_stop_scheduler)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/sim/stats", _sim_stats)
    return app


async def serve(setup: SimEngineSetup, *, host: str, port: int, api_keys: tuple[str, ...] = ()) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly."""
    runner = web.AppRunner(build_app(setup, api_keys=api_keys), handler_cancellation=True, access_log=None,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = runner.addresses[0] if runner.addresses else (host, port)
    print(
        f"tpgate: simulated LMDeploy engine serving {setup.served_model_name!r} ({setup.model.name} on "
        f"{setup.tp} x {setup.gpu.name}, time scale {setup.time_scale:g}) at http://{bound[0]}:{bound[1]}",
        file=sys.stderr, flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def _start_scheduler(app: web.Application) -> None:
    app[SCHEDULER].start()


async def _stop_scheduler(app: web.Application) -> None:
    await app[SCHEDULER].stop()


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = error_body(exc.reason, type=ERROR_TYPE_BY_STATUS.get(exc.status, "api_error"))
        return web.json_response(body, status=exc.status)


def api_key_middleware(api_keys: tuple[str, ...]) -> Middleware:
    """LMDeploy 0.18's ``--api-keys`` (``lmdeploy/serve/utils/server_utils.py``, ``AuthenticationMiddleware``):
    every request needs ``Authorization: Bearer <key>`` with one of ``api_keys`` (compared as SHA-256 digests in
    constant time), except OPTIONS and the paths under ``/health``, ``/docs``, ``/redoc`` and ``/nodes``; else 401.
    ``/metrics`` is not exempt, as in LMDeploy."""
    digests = [hashlib.sha256(key.encode()).digest() for key in api_keys if key]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path.startswith(AUTH_EXEMPT_PREFIXES):
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = hashlib.sha256(token.encode()).digest()
        matched = False
        for digest in digests:
            matched |= secrets.compare_digest(given, digest)
        if scheme.lower() != "bearer" or not matched:
            raise ApiError(401, "Unauthorized.", code="unauthorized")
        return await handler(request)

    return check


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _models(request: web.Request) -> web.Response:
    setup = request.app[SETUP]
    card = {
        "id": setup.served_model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": OWNED_BY,
        "root": f"simulated:{setup.model.name}",
        "parent": None,
        "permission": [],
        "simulated": True,
        "description": (
            f"simulated LMDeploy engine: {setup.model.name} on {setup.tp} x {setup.gpu.name} "
            f"(tpgate performance model, no real model runs)"
        ),
    }
    return web.json_response({"object": "list", "data": [card]})


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    metrics.refresh(request.app[SCHEDULER].stats())
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _sim_stats(request: web.Request) -> web.Response:
    setup = request.app[SETUP]
    stats = request.app[SCHEDULER].stats()
    read_at_s = time.time()
    clock = stats.clock
    return web.json_response({
        "simulated_time_s": stats.now_s,
        "unix_time_s": read_at_s,
        "busy_s": stats.busy_s,
        "time_scale": setup.time_scale,
        "clock_rate_ratio": clock.life_ratio,
        "clock_rate_recent_ratio": clock.recent_ratio,
        "clock_rate_recent_window_s": clock.recent_window_s,
        "wall_time_s": clock.wall_s,
        "running": stats.running,
        "waiting": stats.waiting,
        "queued": stats.queued,
        "kv_cache_blocks": stats.total_blocks,
        "kv_cache_free_blocks": stats.free_blocks,
        "kv_cache_block_tokens": setup.limits.block_tokens,
        "steps": stats.steps,
        "preemptions": stats.preemptions,
        "evicted_blocks": stats.evicted_blocks,
    })


async def _chat(request: web.Request) -> web.StreamResponse:
    check_content_type(request.headers.get("Content-Type"))
    return await _generate(request, parse_chat(await request.read(), request.app[CONTEXT]))


async def _completions(request: web.Request) -> web.StreamResponse:
    check_content_type(request.headers.get("Content-Type"))
    return await _generate(request, parse_completion(await request.read(), request.app[CONTEXT]))


async def _generate(request: web.Request, parsed: GenerationRequest) -> web.StreamResponse:
    """Serve every choice as its own sequence in the engine, as LMDeploy does; cancel what is left on the way out."""
    scheduler = request.app[SCHEDULER]
    writer = ResponseWriter(parsed)
    sequences: list[Sequence] = []
    try:
        if parsed.stream:
            try:
                return await _stream(request, parsed, writer, sequences)
            except ConnectionResetError:  # the client went away mid-stream; nobody is left to answer
                return web.Response(status=499)
        sequences += [_submit(scheduler, parsed, index) for index in range(len(parsed.choices))]
        # asyncio.wait, not gather: a client that goes away cancels this handler, and the sequences must then
        # still be running for scheduler.cancel below to take them out of the batch.
        if sequences:
            await asyncio.wait([seq.done for seq in sequences if seq.done is not None])
        if any(seq.done is not None and seq.done.exception() is not None for seq in sequences):
            raise ApiError(503, "the engine is shutting down")
        return web.json_response(writer.response(), dumps=_compact_json)
    finally:
        for seq in sequences:
            scheduler.cancel(seq)  # no-op when it finished; frees the slot when the client went away


def _submit(scheduler: Scheduler, parsed: GenerationRequest, index: int) -> Sequence:
    choice = parsed.choices[index]
    plan = choice.plan
    return scheduler.submit(Sequence(choice.prompt_tokens, plan.output_tokens, plan.finish_reason,
                                     stream=parsed.stream))


async def _stream(
    request: web.Request, parsed: GenerationRequest, writer: ResponseWriter, sequences: list[Sequence]
) -> web.StreamResponse:
    """SSE: one event per engine step that produced tokens, carrying every choice that made progress."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    scheduler = request.app[SCHEDULER]
    indexes = range(len(parsed.choices))
    groups = [[index] for index in indexes] if parsed.streams_one_choice_at_a_time else [list(indexes)]
    generated = 0
    for group in groups:
        submitted = {index: _submit(scheduler, parsed, index) for index in group}
        sequences += submitted.values()
        if len(group) == 1:  # the common case, and the hot path: no task, no merging
            sent = await _stream_one(response, parsed, writer, group[0], submitted[group[0]])
        else:
            sent = await _stream_together(response, parsed, writer, submitted)
        if sent is None:
            await response.write(sse(error_body("the engine is shutting down", type=ERROR_TYPE_BY_STATUS[503])))
            await response.write(SSE_DONE)
            return response
        generated += sent
    if parsed.include_usage:
        await response.write(sse(writer.usage_chunk(generated)))
    await response.write(SSE_DONE)
    await response.write_eof()
    return response


async def _stream_one(
    response: web.StreamResponse, parsed: GenerationRequest, writer: ResponseWriter, index: int, seq: Sequence
) -> int | None:
    """Stream one choice; returns its tokens, or None when the engine stopped."""
    plan = parsed.choices[index].plan
    sent = 0
    while sent < plan.output_tokens:
        new = await seq.tokens.get()
        while new is not None and not seq.tokens.empty():  # coalesce tokens this writer fell behind on
            more = seq.tokens.get_nowait()
            new = None if more is None else new + more
        if new is None:
            return None
        await response.write(sse(writer.chunk([_delta(parsed, index, sent, new)])))
        sent += new
    return sent


async def _stream_together(
    response: web.StreamResponse, parsed: GenerationRequest, writer: ResponseWriter, sequences: dict[int, Sequence]
) -> int | None:
    """Stream several choices that run at once, one event per step with every choice that progressed; returns
    their tokens, or None when the engine stopped."""
    events: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()
    forwarders = [asyncio.create_task(_forward(index, seq, events)) for index, seq in sequences.items()]
    try:
        sent = dict.fromkeys(sequences, 0)
        while any(sent[index] < parsed.choices[index].plan.output_tokens for index in sequences):
            notices = [await events.get()]
            while not events.empty():  # every choice that produced in this step, and steps this writer missed
                notices.append(events.get_nowait())
            if any(new is None for _, new in notices):
                return None
            new_by_index: dict[int, int] = {}
            for index, new in notices:
                new_by_index[index] = new_by_index.get(index, 0) + (new or 0)
            deltas = [_delta(parsed, index, sent[index], new) for index, new in sorted(new_by_index.items())]
            for index, new in new_by_index.items():
                sent[index] += new
            await response.write(sse(writer.chunk(deltas)))
        return sum(sent.values())
    finally:
        for task in forwarders:
            task.cancel()


async def _forward(index: int, seq: Sequence, events: asyncio.Queue[tuple[int, int | None]]) -> None:
    """Tag one sequence's token notices with its choice index, into the shared queue."""
    received = 0
    while received < seq.output_tokens:
        new = await seq.tokens.get()
        events.put_nowait((index, new))
        if new is None:
            return
        received += new


def _delta(parsed: GenerationRequest, index: int, sent: int, new: int) -> ChoiceDelta:
    plan = parsed.choices[index].plan
    text = filler_text(sent, sent + new, limit_chars=plan.text_chars)
    finished = sent + new >= plan.output_tokens
    return ChoiceDelta(index, text, plan.finish_reason if finished else None)


def _compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
