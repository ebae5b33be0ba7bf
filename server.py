"""Serve a zoo model over HTTP: many sessions at once, batched on the GPU (or CPU), audio streamed
out as it is generated.

    python server.py --model mini-omni                 # http://127.0.0.1:60808
    python server.py --model mini-omni --tiny          # random tiny weights (noise), for tests

Routes
  POST /chat          {"audio": base64 audio file, "stream_stride": 4, "max_tokens": 2048, ...}
                      -> chunked raw PCM s16le mono at the model's output rate (the Mini-Omni
                      reference clients' protocol); with "Accept: multipart/x-mixed-replace" or
                      "format": "multipart", Mini-Omni2-style parts alternating audio and text.
  WS   /v1/realtime   live sessions, OpenAI Realtime event protocol (subset: see serving/realtime.py)
  WS   /v1/duplex     full duplex (models whose card says duplex, e.g. hertz-dev): binary PCM16 LE
                      mono frames both ways at the card's input rate, each complete input frame
                      (card.frame_samples) answered by the model's next frame; JSON text for
                      session.created / session.update / errors (serving/duplex.py)
  WS   /audio         the Hertz-dev reference live protocol: text "data:audio/raw;base64,<int16>"
                      frames of 2000 samples at 16 kHz both ways (its inference_client.py works
                      unchanged with --server ws://HOST:PORT)
  POST /set_temperature?token_temp=&categorical_temp=&gaussian_temp=   the Hertz-dev reference
                      client's knob: the default temperatures of /audio sessions opened afterwards
                      (never a running one), validated as model options (422 otherwise)
  GET  /v1/models     the loaded model's card
  GET  /health        liveness and free session slots
  GET  /metrics       Prometheus metrics

Security (serving/security.py): with --api-key (or OMNI_ZOO_API_KEY) every route but /health needs
"Authorization: Bearer <key>"; WebSockets from a foreign browser Origin are refused (--allow-origin
adds one); at most --max-connections requests at once; /chat takes application/json only; slow
or stalled clients are dropped after --read-timeout; SIGTERM closes sockets with a reason and cuts
replies after 10 s. Every error is a JSON error (or an error event) with a request id that is
also in the log and the X-Request-Id header, and is counted in zoo_errors_total{kind}.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import time

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import zoo
from serving.duplex import DataUrlWire, DuplexSettings, DuplexSocket, Wire, load_prompt
from serving.errors import ApiError, GenerationFailed, ReplyAborted, error_response, report_failure
from serving.http_input import READ_TIMEOUT_S, decode_audio_field, read_json
from serving.realtime import IDLE_TIMEOUT_S, MAX_WS_MESSAGE_BYTES, RealtimeSession
from serving.security import MAX_CONNECTIONS, AccessSettings, Guard, OpenSockets
from serving.service import Service
from serving.transport import serve
from zoo.core.audio import to_pcm16
from zoo.core.cli import add_component_flags, chosen_model, component_values

log = logging.getLogger("omni-zoo.server")

MAX_BODY_BYTES = 25 * 1024 * 1024  # a base64 WAV of 30 s at 48 kHz stereo is ~7.7 MB
MULTIPART_BOUNDARY = b"frame"
# /chat field -> option name: the Mini-Omni reference clients' field names
FIELD_ALIASES = {"max_tokens": "max_new_tokens"}
TRANSPORT_FIELDS = {"audio", "format"}
# /set_temperature query parameter -> option name (the Hertz-dev reference client's names)
TEMPERATURE_PARAMS = {"token_temp": "temperature", "categorical_temp": "categorical_temp",
                      "gaussian_temp": "gaussian_temp"}


def multipart_part(content_type: str, payload: bytes) -> bytes:
    return b"\r\n--" + MULTIPART_BOUNDARY + b"\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n" + payload


def create_app(service: Service, max_body_bytes: int = MAX_BODY_BYTES,
               duplex_settings: DuplexSettings | None = None, access: AccessSettings | None = None, *,
               read_timeout: float = READ_TIMEOUT_S, realtime_idle_s: float = IDLE_TIMEOUT_S) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.close()

    app = FastAPI(title="omni-zoo", version="0.1", lifespan=lifespan)
    model, metrics = service.model, service.metrics
    duplex = duplex_settings or DuplexSettings()
    app.state.open_sockets = OpenSockets()
    app.add_middleware(Guard, settings=access or AccessSettings(), metrics=metrics, sockets=app.state.open_sockets)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        if not err.reported:
            report_failure(metrics, err.kind, f"{request.url.path}: {err.message}", level=logging.WARNING)
        return error_response(err.status, err.kind, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        message = "; ".join(e["msg"] for e in err.errors())
        report_failure(metrics, "bad_request", f"{request.url.path}: {message}", level=logging.WARNING)
        return error_response(422, "bad_request", message)

    @app.get("/health")
    async def health() -> dict:
        health = {"status": "ok", "model": model.card.name, "sessions": service.in_flight,
                  "max_sessions": service.max_sessions, "random_weights": model.random_weights is not None}
        if service.duplex is not None:
            health.update(duplex_sessions=service.duplex.reserved, max_duplex_sessions=service.duplex.max_sessions)
        return health

    @app.get("/v1/models")
    async def models() -> dict:
        card = model.card.to_dict()
        return {"object": "list", "data": [{"id": card["name"], "object": "model", "owned_by": "omni-zoo",
                                            "random_weights": model.random_weights is not None, "card": card}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/chat")
    async def chat(request: Request):
        data = await read_json(request, max_body_bytes, read_timeout)
        audio = decode_audio_field(data)
        options = service.options({FIELD_ALIASES.get(k, k): v for k, v in data.items() if k not in TRANSPORT_FIELDS})
        multipart = data.get("format") == "multipart" or "multipart/x-mixed-replace" in request.headers.get("accept", "")
        reply = service.stream(audio, None, options, received=time.perf_counter())
        try:  # refusals (busy, bad audio) and early failures become HTTP errors before any byte is sent
            first = await anext(reply, None)
        except GenerationFailed as err:  # logged and counted by the service
            raise ApiError(500, "generation", str(err), reported=True) from None

        async def body():
            try:
                chunk = first
                while chunk is not None:
                    pcm = to_pcm16(chunk.audio) if chunk.audio.size else b""
                    if multipart:
                        yield multipart_part("audio/wav", pcm) + multipart_part("text/plain", chunk.text.encode())
                    elif pcm:
                        yield pcm
                    chunk = await anext(reply, None)
            except GenerationFailed as err:  # logged and counted by the service
                if multipart:
                    yield multipart_part("text/plain", f"[error: {err}]".encode())
                raise ReplyAborted(str(err)) from None  # no final chunk: the client sees a truncated reply
            finally:
                await reply.aclose()

        media = f"multipart/x-mixed-replace; boundary={MULTIPART_BOUNDARY.decode()}" if multipart else "application/octet-stream"
        headers = {"X-Model": model.card.name, "X-Sample-Rate": str(model.card.output_sample_rate),
                   "X-Audio-Format": "pcm_s16le", "X-Channels": "1"}
        return StreamingResponse(body(), media_type=media, headers=headers)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        await RealtimeSession(websocket, service, idle_timeout_s=realtime_idle_s).run()

    @app.websocket("/v1/duplex")
    async def duplex_binary(websocket: WebSocket):
        await DuplexSocket(websocket, service, duplex, Wire()).run()

    @app.websocket("/audio")
    async def duplex_reference(websocket: WebSocket):
        await DuplexSocket(websocket, service, duplex, DataUrlWire()).run()

    @app.post("/set_temperature")
    async def set_temperature(request: Request) -> JSONResponse:
        """The Hertz-dev reference client's knob (query parameters): the default temperatures of
        /audio sessions opened afterwards; a running session keeps its own. A parameter left out
        keeps its value; every value is checked as a model option."""
        if service.duplex is None:
            raise ApiError(404, "not_duplex", f"{model.card.name} is not a duplex model")
        given = {}
        for param, option in TEMPERATURE_PARAMS.items():
            raw = request.query_params.get(param)
            if raw is not None:
                try:
                    given[option] = float(raw)
                except ValueError:
                    raise ApiError(422, "bad_option", f"{param} must be a number, got {raw!r}") from None
        values = {**duplex.reference_options, **given}
        options = service.options(values)  # ApiError 422 for NaN, negative, huge
        duplex.reference_options = values
        temps = (options.temperature, (getattr(options, "categorical_temp", None), getattr(options, "gaussian_temp", None)))
        return JSONResponse({"message": f"Temperature updated to: {temps}", "status": "success"})

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
    parser.add_argument("--random-full", action="store_true",
                        help="published dimensions with random weights (noise), for load benchmarks")
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20)
    parser.add_argument("--seed", type=int, default=0)
    security = parser.add_argument_group("security and limits (see README: Security)")
    security.add_argument("--api-key", default=os.environ.get("OMNI_ZOO_API_KEY"),
                          help="require 'Authorization: Bearer KEY' on every route but /health "
                               "(default: env OMNI_ZOO_API_KEY; unset: no key)")
    security.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                          help="a browser origin (e.g. https://chat.example.com) allowed to open WebSockets, "
                               "besides the server's own and loopback pages; repeatable")
    security.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                          help="open WebSockets and streaming replies at once; more are refused with 503")
    security.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S,
                          help="seconds a client may stall while sending a request's headers or body")
    security.add_argument("--realtime-idle-s", type=float, default=IDLE_TIMEOUT_S,
                          help="close a /v1/realtime session after this long without a client event "
                               "(never while a reply is running)")
    duplex = parser.add_argument_group("full duplex (models whose card says duplex)")
    duplex.add_argument("--duplex-sessions", type=int,
                        help="duplex session slots, their caches allocated at start (default: --max-sessions)")
    duplex.add_argument("--duplex-prompt", help="an audio file that seeds every duplex session (as the "
                        "reference server's --prompt_path; stereo = user, model); a client may send its own")
    duplex.add_argument("--duplex-backlog", type=int, default=DuplexSettings.max_backlog_frames,
                        help="input frames a session may have waiting for the model; more are dropped with an error")
    duplex.add_argument("--duplex-idle-s", type=float, default=DuplexSettings.idle_timeout_s,
                        help="close a duplex session after this long without a message")
    duplex.add_argument("--replay-seconds", type=float, default=DuplexSettings.replay_seconds,
                        help="/audio with a prompt: answer the first seconds with the prompt's end, as the reference")
    model = chosen_model(argv, parser.get_default("model"))
    if model in zoo.names():  # an unknown name is reported by the full parser below
        add_component_flags(parser, zoo.card(model))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    components = component_values(args, zoo.card(args.model))
    try:
        random_weights = "full" if args.random_full else "tiny" if args.tiny else None
        model = zoo.load(args.model, device=args.device, dtype=args.dtype, random_weights=random_weights,
                         seed=args.seed, **components)
    except zoo.ZooError as err:
        log.error("%s", err)
        return 2
    if model.random_weights:
        log.warning("RANDOM WEIGHTS (%s): every reply is noise, not speech", model.random_weights)
    prompt = None
    if args.duplex_prompt:
        try:
            prompt = load_prompt(args.duplex_prompt)
        except zoo.ZooError as err:
            log.error("--duplex-prompt: %s", err)
            return 2
    warm_up(model)
    try:
        service = Service(model, args.max_sessions, duplex_sessions=args.duplex_sessions, duplex_prompt=prompt)
    except zoo.ZooError as err:  # e.g. a --duplex-prompt the model refuses
        log.error("%s", err)
        return 2
    if service.duplex is not None:
        log.info("full duplex on /v1/duplex and /audio: %d session slots (%.1f MiB of caches)",
                 service.duplex.max_sessions, service.duplex.nbytes() / 2**20)
    settings = DuplexSettings(max_backlog_frames=args.duplex_backlog, idle_timeout_s=args.duplex_idle_s,
                              replay_seconds=args.replay_seconds)
    access = AccessSettings(api_key=args.api_key or None, allowed_origins=tuple(args.allow_origin),
                            max_connections=args.max_connections)
    if access.api_key is None and not is_loopback(args.host):
        log.warning("--host %s is reachable from other machines and no --api-key is set: anyone who can "
                    "reach it can use the model", args.host)
    log.info("serving %s on http://%s:%d (max %d sessions)", model.card.name, args.host, args.port, args.max_sessions)
    app = create_app(service, int(args.max_body_mb * 2**20), settings, access, read_timeout=args.read_timeout,
                     realtime_idle_s=args.realtime_idle_s)
    serve(app, app.state.open_sockets, host=args.host, port=args.port, read_timeout=args.read_timeout,
          ws_max_size=MAX_WS_MESSAGE_BYTES)
    return 0


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    raise SystemExit(main())
