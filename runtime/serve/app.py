"""The ASGI app (Starlette): generation endpoints, health, readiness, metrics, schema.

    POST /v1/instantid, /v1/ip-adapter, /v1/ip-adapter-plus   generate (JSON+base64 or multipart)
    GET  /healthz    200 while the process and its worker thread live
    GET  /readyz     200 after warm-up, else 503 with the reason
    GET  /metrics    Prometheus text format
    GET  /v1/schema  the request schemas, served pipelines and limits
    GET  /openapi.json  the OpenAPI 3.1 document of every route (runtime/serve/openapi.py)
    GET  /docs       that document as a web page (static HTML, works offline)

A generation request sent with `Accept: text/event-stream` is answered with Server-Sent Events:
`queued`, `started`, then `done` (the JSON response) or `error`.

Overload never queues without bound: a request is admitted to the queue only once its body is read
(within `body_timeout_s`, else 408) and validated; beyond `max_queue` waiting ones it is answered
429 at once (with Retry-After), before warm-up or during shutdown 503, past its deadline 504 (its
slot freed at once, its run stopped between denoising steps). The GPU worker only ever sees
requests that are decoded, validated and still wanted. Error messages never carry server paths.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.serve.batching import BatchQueue, DeadlineExceeded, QueueClosed, QueueFull
from runtime.serve.inputs import Limits, read_fields, resolve_request, validate
from runtime.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from runtime.serve.openapi import docs_page, openapi_document
from runtime.serve.schemas import (FORMATS, MAX_MESSAGE_CHARS, REQUEST_MODELS, BadRequest, GenerateResponse, ImageOut,
                                   shorten)
from runtime.serve.served import ServedPipeline

log = logging.getLogger("runtime.serve")


@dataclass
class ServeConfig:
    """Server settings (the `python -m runtime.serve` flags)."""

    max_queue: int = 16
    max_batch: int = 4
    batch_wait_ms: float = 5.0
    timeout_s: float = 300.0
    limits: Limits = field(default_factory=Limits)
    body_timeout_s: float = 30.0  # from the request's headers to the end of its body (408 beyond)
    private_paths: tuple[str, ...] = ()  # e.g. the build directory: never shown in an answer


@dataclass
class ServerState:
    """What the endpoints share: pipelines (once loaded), the queue, metrics, readiness."""

    config: ServeConfig
    metrics: Metrics
    queue: BatchQueue | None = None
    pipelines: dict[str, ServedPipeline] = field(default_factory=dict)
    ready: bool = False
    not_ready_reason: str = "loading the pipelines"
    shutting_down: bool = False

    def begin_shutdown(self, grace_s: float | None = None) -> None:
        """Stop serving: not ready, new requests 503, the waiting ones failed now with 503
        `shutting_down`; the running batch goes on (stopped between steps after `grace_s` - 1 s)."""
        self.shutting_down, self.ready = True, False
        self.not_ready_reason = "shutting down"
        self.metrics.ready.set(0)
        if self.queue is not None:
            self.queue.close(timeout_s=0, stop_running_after_s=None if grace_s is None else max(0.0, grace_s - 1))


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error body; its message at most MAX_MESSAGE_CHARS, whatever of the request it quotes."""
    message = shorten(message, MAX_MESSAGE_CHARS)
    return JSONResponse({"error": {"status": status, "kind": kind, "message": message}}, status, headers=headers)


class ClientGone(ConnectionError):
    """The client disconnected while its request waited; answered 499 (nobody reads it)."""


class BodyTimeout(TimeoutError):
    """The request body did not arrive within body_timeout_s: answered 408."""


_ROUTES = ("/v1/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/<>-])/(?:[^\s/'\"`:,;()\[\]{}<>]+/)*([^\s/'\"`:,;()\[\]{}<>]*)")


def public_message(message: str, private_paths: tuple[str, ...] = ()) -> str:
    """`message` without server paths: each of `private_paths` (longest first) becomes '<build>',
    any other absolute path its last component ('/srv/build/onnx/x.onnx' -> 'x.onnx')."""
    for path in sorted((p for p in private_paths if p), key=len, reverse=True):
        message = message.replace(path, "<build>")

    def public(match: re.Match) -> str:
        text = match.group(0)
        if text.startswith(_ROUTES):  # the server's own routes ('see GET /v1/schema') are not paths
            return text
        return match.group(1) or ("/" if text == "/" else "<path>")
    return _ABSOLUTE_PATH.sub(public, message)


def classify(error: BaseException) -> tuple[int, str, str]:
    """A pipeline/queue exception -> (HTTP status, error kind, message for the client)."""
    from runtime.face import FaceIndexError, NoFaceError
    from runtime.images import ImageError

    name = type(error).__name__
    if isinstance(error, BadRequest):
        return error.status, error.kind, str(error)
    if isinstance(error, BodyTimeout):
        return 408, "body_timeout", str(error)
    if isinstance(error, ClientDisconnect):
        return 499, "client_closed", "the client closed the connection during the upload"
    if name == "DenoiseCancelled":  # stopped between steps; only a shutdown leaves a client waiting for it
        return 503, "shutting_down", "the server shut down before this request finished: retry on another replica"
    if isinstance(error, NoFaceError):
        return 422, "no_face", str(error)
    if isinstance(error, FaceIndexError):
        return 422, "face_index", str(error)
    if isinstance(error, ImageError):
        return 422, "bad_image", str(error)
    if isinstance(error, ClientGone):
        return 499, "client_closed", str(error)
    if isinstance(error, QueueFull):
        return 429, "queue_full", str(error)
    if isinstance(error, QueueClosed):
        return 503, "shutting_down", str(error)
    if isinstance(error, (DeadlineExceeded, TimeoutError)):
        return 504, "timeout", str(error) or "the request did not finish within its timeout: retry later"
    if name in ("ResolutionError", "RequestError") or (isinstance(error, ValueError) and name == "ValueError"):
        return 422, "invalid_request", str(error)
    if name == "NonFiniteError":
        return 500, "non_finite", str(error)
    return 500, "internal", f"{name}: {error} (the server log has the traceback)"


def encode_image(image, fmt: str, quality: int) -> bytes:
    """PIL image -> PNG / JPEG / WebP bytes."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, fmt.upper(), quality=quality)
    return buffer.getvalue()


def _start(state: ServerState, load: Callable[[], dict[str, ServedPipeline]],
           on_failure: Callable[[BaseException], None] | None = None) -> None:
    """Load and warm up the pipelines (a background thread), then start the worker: ready.
    A failure is final: /readyz reports it, and on_failure(error) is called (the CLI exits)."""
    try:
        pipelines = load()
        for name, served in pipelines.items():
            state.not_ready_reason = f"warming up {name}"
            start = time.perf_counter()
            served.warmup()
            log.info("warmed up %s in %.1f s", name, time.perf_counter() - start)
        state.pipelines = pipelines
        queue = BatchQueue(lambda key, payloads, stops: pipelines[key[0]].run_batch(key, payloads, stops),
                           state.config.max_queue, state.config.max_batch, state.config.batch_wait_ms / 1000,
                           state.metrics.batch_stats())
        queue.start()
        state.queue = queue
        state.ready = True
        state.metrics.ready.set(1)
        log.info("ready: %s", ", ".join(pipelines))
    except Exception as error:  # noqa: BLE001 - reported by /readyz and the log
        state.not_ready_reason = public_message(f"start-up failed: {type(error).__name__}: {error}",
                                                state.config.private_paths)
        log.exception("start-up failed")
        if on_failure is not None:
            on_failure(error)


def create_app(config: ServeConfig, load: Callable[[], dict[str, ServedPipeline]],
               on_failure: Callable[[BaseException], None] | None = None) -> Starlette:
    """The app; `load()` returns the pipelines (called once, in a background thread at start-up);
    `on_failure(error)` is called when that start-up fails (e.g. to stop the server)."""
    state = ServerState(config, Metrics())

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=_start, args=(state, load, on_failure), name="serve-startup", daemon=True).start()
        yield
        state.begin_shutdown()
        if state.queue is not None:
            await anyio.to_thread.run_sync(state.queue.close)

    async def healthz(request: Request) -> Response:
        if state.queue is not None and not state.queue.alive:
            return _error(500, "worker_dead", "the worker thread died: restart the server")
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not state.ready:
            return _error(503, "not_ready", state.not_ready_reason)
        return JSONResponse({"status": "ready", "pipelines": list(state.pipelines),
                             "queue_depth": state.queue.depth(), "running": state.queue.running()})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def schema(request: Request) -> Response:
        return JSONResponse({
            "pipelines": {name: served.info for name, served in state.pipelines.items()},
            "requests": {name: model.model_json_schema() for name, model in REQUEST_MODELS.items()},
            "response": GenerateResponse.model_json_schema(),
            "limits": {**config.limits.__dict__, "max_queue": config.max_queue, "max_batch": config.max_batch,
                       "timeout_s": config.timeout_s}})

    def document() -> dict:  # the served pipelines once loaded; before, every pipeline a build can have
        from runtime.pipelines import PIPELINES

        return openapi_document(list(state.pipelines) or list(PIPELINES))

    async def openapi(request: Request) -> Response:
        return JSONResponse(document())

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_page(document()))

    async def generate(request: Request) -> Response:
        name = request.path_params["pipeline"]
        started = time.perf_counter()
        if state.shutting_down:
            response = _error(503, "shutting_down", "the server is shutting down: retry on another replica",
                              {"Retry-After": "1", "Connection": "close"})
        elif not state.ready and state.not_ready_reason.startswith("start-up failed"):
            response = _error(503, "not_ready", f"not ready, and it will not be: {state.not_ready_reason}")
        elif not state.ready:
            response = _error(503, "not_ready", f"not ready ({state.not_ready_reason}): retry in a few seconds",
                              {"Retry-After": "5"})
        elif name not in state.pipelines:
            response = _error(404, "no_pipeline", f"this server runs {', '.join(state.pipelines)}, not {name!r}")
        else:
            response = await _generate(request, name, started)
            if isinstance(response, StreamingResponse):
                return response  # counted by _events when the stream ends
        if response.status_code >= 400:
            kind = response.headers.get("x-error-kind") or _kind_of(response)
            state.metrics.answer(name, response.status_code, kind)
        else:
            state.metrics.answer(name, response.status_code)
        return response

    async def _generate(request: Request, name: str, started: float) -> Response:
        served = state.pipelines[name]
        timings: dict[str, float] = {}
        try:
            try:  # the whole body within body_timeout_s of its headers: slow uploads never hold the server
                fields = await asyncio.wait_for(read_fields(request, config.limits), config.body_timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within {config.body_timeout_s:g} s: send it "
                                  "at once (a smaller, JPEG photo helps on a slow link)") from None
            request_model, images = validate(name, fields)
            t0 = time.perf_counter()
            generation, key = await anyio.to_thread.run_sync(
                resolve_request, name, request_model, images, config.limits, served.default_size,
                served.info.get("default_resolution", 1024))
            timings["decode"] = time.perf_counter() - t0
            timeout = min(request_model.timeout_s or config.timeout_s, config.timeout_s)
            job = state.queue.submit(key, generation, timeout)
            if "text/event-stream" in request.headers.get("accept", ""):
                request_model.output = "json"
                return StreamingResponse(_events(name, job, request_model, timings, started, timeout),
                                         media_type="text/event-stream", headers={"cache-control": "no-cache"})
            response = await _finish(name, job, request_model, timings, started, timeout, request)
        except Exception as error:  # noqa: BLE001 - every failure becomes a JSON answer
            return error_response(name, error, config.private_paths)
        return response

    async def _finish(name, job, request_model, timings, started, timeout, request=None) -> Response:
        """Wait for the job (until the deadline, or until the client of `request` hangs up: then the
        job is cancelled and never reaches the GPU if it has not started), encode, record timings."""
        waiter = asyncio.wrap_future(job.future)  # cancelling it cancels the job's future
        while True:
            left = timeout - (time.perf_counter() - started)
            try:
                done, _ = await asyncio.wait([waiter], timeout=max(0.0, min(0.5, left)))
            except asyncio.CancelledError:  # the stream's client left, or uvicorn's shutdown grace ran out
                state.queue.drop(job, "cancelled")
                raise
            if done:
                break
            if left <= 0.5:  # its slot is freed now; a run in progress stops at the next step
                state.queue.drop(job, "deadline")
                waiter.cancel()
                raise TimeoutError(f"not finished after {timeout:g} s (queue depth {state.queue.depth()}): "
                                   "retry later, lower steps/size, or raise timeout_s")
            if request is not None and await request.is_disconnected():
                state.queue.drop(job, "cancelled")
                waiter.cancel()
                raise ClientGone("the client closed the connection before the answer")
        images_out = waiter.result()
        timings["queue"] = job.started - job.enqueued
        timings["run"] = job.finished - job.started
        response = await anyio.to_thread.run_sync(respond, name, request_model, images_out, timings, started)
        for stage, seconds in timings.items():
            state.metrics.stage.labels(name, stage).observe(seconds)
        return response

    async def _events(name, job, request_model, timings, started, timeout):
        """Server-Sent Events: `queued` (queue depth), `started`, then `done` (the JSON response) or
        `error` (the error body). The loop runs as one CUDA graph, so there are no per-step events."""
        finish = asyncio.ensure_future(_finish(name, job, request_model, timings, started, timeout))
        status, kind = 499, "client_closed"  # unless the stream gets to its last event
        try:
            yield _sse("queued", {"queue_depth": state.queue.depth()})
            while not finish.done() and not job.started:
                await asyncio.wait([finish], timeout=0.1)
            if job.started:
                yield _sse("started", {"waited_ms": round((job.started - job.enqueued) * 1000, 1)})
            try:
                response = await finish
            except Exception as error:  # noqa: BLE001 - reported in the stream
                status, kind, message = classify(error)
                yield _sse("error", {"status": status, "kind": kind,
                                     "message": public_message(message, config.private_paths)})
            else:
                status, kind = 200, None
                yield _sse("done", json.loads(response.body))
        finally:  # counted as the stream ended; a client that hung up mid-stream frees its job
            if not finish.done():
                finish.cancel()
                state.queue.drop(job, "cancelled")
            state.metrics.answer(name, status, kind)

    routes = [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
              Route("/v1/schema", schema), Route("/openapi.json", openapi), Route("/docs", docs),
              Route("/v1/{pipeline}", generate, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.serve = state
    return app


def error_response(name: str, error: BaseException, private_paths: tuple[str, ...] = ()) -> JSONResponse:
    """The JSON error answer of an exception (logged with its traceback when it is a 5xx); its
    message never shows a server path (`public_message`)."""
    status, kind, message = classify(error)
    if status >= 500 and status not in (503, 504):  # overload answers are not server faults
        log.error("%s request failed: %s", name, message, exc_info=error)
    elif status in (408, 499):
        log.info("%s request: %s (%s)", name, kind, message)
    headers = {"x-error-kind": kind, **({"Retry-After": "1"} if status in (429, 503) else {}),
               **({"Connection": "close"} if status == 408 else {})}
    return _error(status, kind, public_message(message, private_paths), headers)


def respond(name: str, request, images: list, timings: dict[str, float], started: float) -> Response:
    """Encode the generated images as the request asked (body bytes or JSON base64); adds the
    'encode' and 'total' timings (seconds) to `timings`. The images' `warnings` (served.Images: a
    truncated prompt) go into the JSON's `warnings`, or the `x-warnings` header of an image answer."""
    t0 = time.perf_counter()
    encoded = [encode_image(image, request.format, request.quality) for image in images]
    timings["encode"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    header = ",".join(f"{stage}={seconds * 1000:.1f}" for stage, seconds in timings.items())
    warnings = list(getattr(images, "warnings", ()))
    if request.output == "image":
        headers = {"x-seed": str(request.seed), "x-timings-ms": header}
        if warnings:  # one header line, ASCII (a prompt's other characters escaped)
            headers["x-warnings"] = " | ".join(warnings).encode("ascii", "backslashreplace").decode()
        return Response(encoded[0], media_type=FORMATS[request.format], headers=headers)
    body = GenerateResponse(
        pipeline=name, format=request.format, seed=request.seed,
        images=[ImageOut(data=base64.b64encode(data).decode(), width=image.width, height=image.height)
                for data, image in zip(encoded, images)],
        timings_ms={stage: round(seconds * 1000, 2) for stage, seconds in timings.items()}, warnings=warnings)
    return JSONResponse(body.model_dump(), headers={"x-timings-ms": header})


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _kind_of(response: Response) -> str:
    return {404: "no_pipeline", 429: "queue_full", 503: "not_ready"}.get(response.status_code, "error")
