"""Serve a zoo model over HTTP: many sessions at once, batched on the GPU (or CPU), audio streamed
out as it is generated.

    python server.py --model mini-omni                 # http://127.0.0.1:60808
    python server.py --model mini-omni --tiny          # random tiny weights (noise), for tests

Routes
  POST /chat          {"audio": base64 audio file, "stream_stride": 4, "max_tokens": 2048, ...}
                      -> chunked raw PCM s16le mono at the model's output rate (the Mini-Omni
                      reference clients' protocol); with "Accept: multipart/x-mixed-replace" or
                      "format": "multipart", Mini-Omni2-style parts alternating audio and text.
  GET  /v1/models     the loaded model's card
  GET  /health        liveness and free session slots
  GET  /metrics       Prometheus metrics
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

import zoo
from zoo.core.audio import to_pcm16
from zoo.core.scheduler import Busy, Scheduler

log = logging.getLogger("omni-zoo.server")

MAX_BODY_BYTES = 25 * 1024 * 1024  # a base64 WAV of 30 s at 48 kHz stereo is ~7.7 MB
MULTIPART_BOUNDARY = b"frame"
# request field -> option name, for the reference clients' field names
FIELD_ALIASES = {"max_tokens": "max_new_tokens"}
TRANSPORT_FIELDS = {"audio", "format"}


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions_active = Gauge("zoo_sessions_active", "sessions being served", registry=self.registry)
        self.sessions_total = Counter("zoo_sessions_total", "sessions accepted", registry=self.registry)
        self.ttfa = Histogram("zoo_ttfa_seconds", "request complete -> first audio byte sent", registry=self.registry,
                              buckets=(0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.rtf = Histogram("zoo_rtf", "compute time / audio time per session", registry=self.registry,
                             buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10))
        self.errors = Counter("zoo_errors_total", "requests that failed, by kind", ["kind"], registry=self.registry)
        self.disconnects = Counter("zoo_disconnects_total", "clients gone before the reply ended", registry=self.registry)


class Service:
    """The loaded model, its scheduler and the admission count (shared by every route)."""

    def __init__(self, model: zoo.VoiceModel, max_sessions: int, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.model, self.max_sessions, self.max_body_bytes = model, max_sessions, max_body_bytes
        self.stepper = model.stepper(max_sessions)
        self.scheduler = Scheduler(self.stepper, max_sessions)
        # input decoding and audio encoding run here, off the event loop and off the decode thread
        self.prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zoo-prepare")
        self.in_flight = 0
        self.metrics = Metrics()
        self.option_names = {f.name for f in fields(model.options_class)}

    def admit(self) -> None:
        if self.in_flight >= self.max_sessions:
            self.metrics.errors.labels("busy").inc()
            raise ApiError(503, "busy", f"all {self.max_sessions} session slots are busy; retry shortly",
                           headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.sessions_active.dec()

    def options(self, body: dict):
        values = {}
        for key, value in body.items():
            if key in TRANSPORT_FIELDS:
                continue
            name = FIELD_ALIASES.get(key, key)
            if name not in self.option_names:
                raise ApiError(400, "bad_request", f"unknown field {key!r}; known: "
                               f"{sorted(TRANSPORT_FIELDS | set(FIELD_ALIASES) | self.option_names)}")
            values[name] = value
        try:
            return self.model.options(values)
        except zoo.OptionsError as err:
            raise ApiError(422, "bad_option", str(err)) from None


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body over {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, "too_large", f"request body over {limit} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    return data


def decode_audio_field(data: dict) -> bytes:
    value = data.get("audio")
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_request", "field 'audio' (base64 of an audio file) is required")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", "field 'audio' is not valid base64") from None


def multipart_part(content_type: str, payload: bytes) -> bytes:
    return b"\r\n--" + MULTIPART_BOUNDARY + b"\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n" + payload


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.scheduler.close()
        service.prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="omni-zoo", version="0.1", lifespan=lifespan)
    model, metrics = service.model, service.metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        if err.kind != "busy":
            metrics.errors.labels(err.kind).inc()
        return JSONResponse({"error": {"type": err.kind, "message": err.message}}, err.status, headers=err.headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.card.name, "sessions": service.in_flight,
                "max_sessions": service.max_sessions, "random_weights": bool(getattr(model, "tiny", False))}

    @app.get("/v1/models")
    async def models() -> dict:
        card = model.card.to_dict()
        return {"object": "list", "data": [{"id": card["name"], "object": "model", "owned_by": "omni-zoo",
                                            "random_weights": bool(getattr(model, "tiny", False)), "card": card}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/chat")
    async def chat(request: Request):
        data = await read_json(request, service.max_body_bytes)
        audio = decode_audio_field(data)
        options = service.options(data)
        multipart = data.get("format") == "multipart" or "multipart/x-mixed-replace" in request.headers.get("accept", "")
        service.admit()
        received = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            job = await loop.run_in_executor(service.prepare_pool, service.stepper.prepare, audio, None, options)
            queue: asyncio.Queue = asyncio.Queue()
            ticket = service.scheduler.submit(job, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        except zoo.ZooError as err:
            service.leave()
            raise ApiError(400, "bad_audio" if isinstance(err, zoo.AudioInputError) else "bad_request", str(err)) from None
        except Busy as err:
            service.leave()
            raise ApiError(503, "busy", str(err), headers={"Retry-After": "1"}) from None
        except BaseException:
            service.leave()
            raise

        async def body():
            first_audio, samples, finished = None, 0, False
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        finished = True
                        return
                    if isinstance(item, Exception):
                        log.error("generation failed: %s", item)
                        metrics.errors.labels("generation").inc()
                        if multipart:
                            yield multipart_part("text/plain", f"[error: {item}]".encode())
                        return
                    pcm = to_pcm16(item.audio) if item.audio.size else b""
                    if pcm and first_audio is None:
                        first_audio = time.perf_counter()
                        metrics.ttfa.observe(first_audio - received)
                    samples += item.audio.size
                    if multipart:
                        yield multipart_part("audio/wav", pcm) + multipart_part("text/plain", item.text.encode())
                    elif pcm:
                        yield pcm
            finally:
                if not finished:
                    metrics.disconnects.inc()
                service.scheduler.cancel(ticket)
                if samples:
                    metrics.rtf.observe((time.perf_counter() - received) / (samples / model.card.output_sample_rate))
                service.leave()

        media = f"multipart/x-mixed-replace; boundary={MULTIPART_BOUNDARY.decode()}" if multipart else "application/octet-stream"
        headers = {"X-Model": model.card.name, "X-Sample-Rate": str(model.card.output_sample_rate),
                   "X-Audio-Format": "pcm_s16le", "X-Channels": "1"}
        return StreamingResponse(body(), media_type=media, headers=headers)

    return app


def warm_up(model: zoo.VoiceModel) -> None:
    """One short reply so the first client does not pay for lazy initialisation."""
    silence = np.zeros(model.card.input_sample_rate, np.float32)
    for _ in model.respond(silence, model.card.input_sample_rate, {"max_new_tokens": 12}):
        pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini-omni", choices=zoo.names())
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    parser.add_argument("--port", type=int, default=60808)
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--tiny", action="store_true", help="tiny random weights (noise), for tests")
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20)
    parser.add_argument("--seed", type=int, default=0)
    known, _ = parser.parse_known_args(argv)
    for component in zoo.card(known.model).components:
        parser.add_argument(f"--{component.replace('_', '-')}", dest=component, metavar="REPO_OR_DIR")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    components = {c: getattr(args, c) for c in zoo.card(args.model).components if getattr(args, c, None)}
    try:
        model = zoo.load(args.model, device=args.device, dtype=args.dtype, tiny=args.tiny, seed=args.seed, **components)
    except zoo.ZooError as err:
        log.error("%s", err)
        return 2
    if args.tiny:
        log.warning("RANDOM WEIGHTS (--tiny): every reply is noise, not speech")
    warm_up(model)
    service = Service(model, args.max_sessions, int(args.max_body_mb * 2**20))
    log.info("serving %s on http://%s:%d (max %d sessions)", model.card.name, args.host, args.port, args.max_sessions)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
