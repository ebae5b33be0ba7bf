"""``create_app``: the FastAPI app over one Service: the gate (serving/security.py), JSON errors,
``/health``, ``/v1/models``, ``/metrics``, and every wire protocol of serving/protocols/ that the
model's card allows."""
from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from zoo.cli import noise_notice

from .errors import ApiError, error_response, report_failure
from .http_input import READ_TIMEOUT_S
from .protocols import chat, duplex, hertz_reference, kyutai_reference, realtime
from .protocols.duplex import DuplexSettings
from .protocols.hertz_reference import ReferenceSettings
from .security import AccessSettings, Guard, OpenSockets
from .service import Service


def create_app(service: Service, max_body_bytes: int = chat.MAX_BODY_BYTES,
               duplex_settings: DuplexSettings | None = None, access: AccessSettings | None = None, *,
               read_timeout: float = READ_TIMEOUT_S, realtime_idle_s: float = realtime.IDLE_TIMEOUT_S,
               reference_settings: ReferenceSettings | None = None, guarded: bool = True) -> FastAPI:
    """``service``: a Service, or anything with its port (``model``, ``metrics``, ``options``,
    ``stream``, ``in_flight``, ``max_sessions``, ``duplex``, ``close``), e.g. serving/scale/remote.py's
    RemoteService. ``guarded=False``: no gate of its own (a front that holds several of these apps
    puts one gate before them all: serving/scale/front.py)."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.close()

    app = FastAPI(title="omni-zoo", version="0.1", lifespan=lifespan)
    model, metrics = service.model, service.metrics
    duplex_settings = duplex_settings or DuplexSettings()
    app.state.open_sockets = OpenSockets()
    if guarded:
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
        return {"object": "list", "data": [model_entry(model)]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    chat.install(app, service, max_body_bytes=max_body_bytes, read_timeout=read_timeout)
    realtime.install(app, service, idle_timeout_s=realtime_idle_s)
    duplex.install(app, service, duplex_settings)
    hertz_reference.install(app, service, duplex_settings, reference_settings or ReferenceSettings())
    kyutai_reference.install(app, service, duplex_settings)
    return app


def model_entry(model) -> dict:
    """A model's entry in ``GET /v1/models`` (OpenAI's shape, plus its card and random-weight notice)."""
    card = model.card.to_dict()
    return {"id": card["name"], "object": "model", "owned_by": "omni-zoo", "random_weights": model.random_weights is not None,
            "notice": noise_notice(model), "default_max_new_tokens": model.default_max_new_tokens, "card": card}
