"""The ASGI front of a scaled deployment: one gate (serving/security.py: request ids, API key,
Origin, connection limit) before one app per model (serving/app.py create_app over a
RemoteService, so every protocol is the single-process server's own code), plus the routes that
speak for all models at once.

Choosing a model, first match wins:
  1. a path prefix: ``/<model>/chat``, ``/<model>/v1/realtime``, ... (``/<model>/health`` too);
  2. ``?model=<name>`` in the query (what the OpenAI SDK puts on its realtime socket URL);
  3. the ``model`` field of a ``POST /chat`` body (OpenAI style);
  4. otherwise the first model given on the command line.
An unknown name is a 404 ``model_not_found`` that lists the names.

``/health``, ``/v1/models`` and ``/metrics`` answer for every model: the models' entries of
``/v1/models`` (each with its card), each model's replicas by Serve state and its own state
(``ok``, ``degraded``, ``unavailable``: model_state) in ``/health``, whose status is ``ok`` while
every model has a running replica, and one
Prometheus registry shared by the front's models (``zoo_*``, counted at the front).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..app import model_entry
from ..errors import ApiError, error_response, report_failure
from ..http_input import read_json
from ..metrics import Metrics
from ..security import AccessSettings, Guard, OpenSockets

SHARED_PATHS = {"/health", "/v1/models", "/metrics"}


class ModelRouter:
    """``apps``: model name -> its ASGI app (in command-line order, the first is the default);
    ``shared``: the app of SHARED_PATHS; ``chat_body_limit``/``read_timeout``: the limits of the
    /chat body read here to find its ``model`` field (the same as the chat route's own)."""

    def __init__(self, apps: dict, shared, metrics: Metrics, chat_body_limit: int, read_timeout: float) -> None:
        self.apps, self.shared, self.metrics = apps, shared, metrics
        self.default = next(iter(apps))
        self.chat_body_limit, self.read_timeout = chat_body_limit, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return  # lifespan: the replicas belong to Serve, nothing to start or stop here
        try:
            name, scope, receive = await self.route(scope, receive)
        except ApiError as err:
            report_failure(self.metrics, err.kind, f"{scope['path']}: {err.message}", level=logging.WARNING)
            await self.answer(scope, receive, send, error_response(err.status, err.kind, err.message))
            return
        await (self.apps[name] if name is not None else self.shared)(scope, receive, send)

    async def route(self, scope, receive) -> tuple[str | None, dict, Callable[[], Awaitable[dict]]]:
        head, _, rest = scope["path"].lstrip("/").partition("/")
        if head in self.apps:
            return head, {**scope, "path": "/" + rest, "root_path": scope.get("root_path", "") + "/" + head}, receive
        if scope["path"] in SHARED_PATHS:
            return None, scope, receive
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "model" in query:
            return self.known(query["model"][-1]), scope, receive
        if scope["type"] == "http" and scope["path"] == "/chat" and scope.get("method") == "POST":
            data = await read_json(Request(scope, receive), self.chat_body_limit, self.read_timeout)
            body = json.dumps(data).encode()
            return self.known(data.get("model", self.default)), scope, replay(body, receive)
        return self.default, scope, receive

    def known(self, name) -> str:
        if name not in self.apps:
            raise ApiError(404, "model_not_found", f"no model {name!r} here; this deployment serves "
                                                   f"{sorted(self.apps)} (GET /v1/models)")
        return name

    @staticmethod
    async def answer(scope, receive, send, response: Response) -> None:
        if scope["type"] == "http":
            await response(scope, receive, send)
        else:  # a refused WebSocket handshake gets the JSON as an HTTP response (see security.Guard)
            await send({"type": "websocket.http.response.start", "status": response.status_code,
                        "headers": response.raw_headers})
            await send({"type": "websocket.http.response.body", "body": response.body})


def replay(body: bytes, receive):
    """A ``receive`` that hands the app a body already read (once), then the connection's own
    messages (a streaming response listens there for the client's disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def shared_app(services: dict, metrics: Metrics, replica_states: Callable[[], Awaitable[dict]]) -> FastAPI:
    """``/health``, ``/v1/models``, ``/metrics`` over every model. ``services``: name -> its
    RemoteService; ``replica_states``: async () -> {name: {state: count}} (ingress.py)."""
    app = FastAPI(title="omni-zoo (scaled)")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.kind, err.message, err.headers)

    @app.get("/health")
    async def health() -> dict:
        states = await replica_states()
        models = {name: {"state": model_state(states.get(name, {})), "replicas": states.get(name, {}),
                         "sessions": s.in_flight, "max_sessions": s.max_sessions,
                         "random_weights": s.model.random_weights is not None,
                         **({"duplex_sessions": s.duplex.reserved, "max_duplex_sessions": s.duplex.max_sessions}
                            if s.duplex is not None else {})} for name, s in services.items()}
        ready = all(m["state"] != "unavailable" for m in models.values())
        return {"status": "ok" if ready else "degraded", "models": models}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_entry(s.model) for s in services.values()]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def model_state(replicas: dict[str, int]) -> str:
    """``ok``: every replica running; ``degraded``: some are starting, restarting or stopping,
    but at least one serves; ``unavailable``: none runs (its requests get 503)."""
    running = replicas.get("RUNNING", 0)
    if not running:
        return "unavailable"
    return "ok" if running == sum(replicas.values()) else "degraded"


def guarded(router: ModelRouter, access: AccessSettings | None, metrics: Metrics) -> tuple[Guard, OpenSockets]:
    sockets = OpenSockets()
    # Serve's proxy names every request (x-request-id, echoed in the response): that is its id here too
    return Guard(router, settings=access or AccessSettings(), metrics=metrics, sockets=sockets,
                 upstream_id_header="x-request-id"), sockets
