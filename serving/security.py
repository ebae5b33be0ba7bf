"""The gate in front of every route (an ASGI middleware): a request id for each request or
WebSocket session, the API key, the WebSocket ``Origin`` check, and the connection limit. Refusals
happen before the route runs: HTTP gets a JSON error, a WebSocket handshake gets the same JSON as
an HTTP response (401 / 403 / 503) instead of an upgrade.

- API key (``--api-key`` / ``OMNI_ZOO_API_KEY``): every route but /health needs
  ``Authorization: Bearer <key>`` (what the OpenAI SDK sends, on its realtime socket too).
  Browsers cannot set headers on a WebSocket, so a socket may instead offer the subprotocol
  ``openai-insecure-api-key.<key>`` (OpenAI's convention for browser clients) next to another one
  that the server then selects. Compared in constant time.
- Origin: a browser page from another site must not drive a session in its visitor's name
  (cross-site WebSocket hijacking). A WebSocket with an ``Origin`` header is allowed when it is
  the server's own origin (same host as ``Host``), a loopback page (a local web UI), or listed
  with ``--allow-origin``; no Origin header means a non-browser client.
- Connections: at most ``max_connections`` requests at once (every open WebSocket and every
  streaming reply; /health and /metrics are not counted so the server stays observable).
- Access log: one line per request or WebSocket session, refusals included (serving/access_log.py).
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
from urllib.parse import urlsplit

from .access_log import AccessRecord
from .errors import ReplyAborted, error_body, new_request_id, report_failure, request_id

UNAUTHENTICATED_PATHS = {"/health"}
UNCOUNTED_PATHS = {"/health", "/metrics"}
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
KEY_SUBPROTOCOL = "openai-insecure-api-key."
MAX_CONNECTIONS = 256


@dataclasses.dataclass
class AccessSettings:
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_connections: int = MAX_CONNECTIONS


class Refusal(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _subprotocols(headers: dict[str, str]) -> list[str]:
    return [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]


UPSTREAM_ID = re.compile(r"[\w.-]{1,64}")


def _without_id_header(send):
    """``send`` less this module's own x-request-id on HTTP responses (the proxy adds the same id)."""
    async def sending(message) -> None:
        if message["type"] in ("http.response.start", "websocket.http.response.start"):
            message = {**message, "headers": [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]}
        await send(message)

    return sending


class Guard:
    """The ASGI middleware; ``sockets`` collects the open WebSockets for the shutdown."""

    def __init__(self, app, settings: AccessSettings, metrics, sockets: OpenSockets, *,
                 upstream_id_header: str | None = None) -> None:
        """``upstream_id_header``: behind a proxy that gives every request an id in this request
        header and echoes it in the response (Ray Serve's ``x-request-id``), that id is the
        request's id here too (log, errors), and the response carries it once."""
        self.app, self.settings, self.metrics, self.sockets = app, settings, metrics, sockets
        self.upstream_id_header = upstream_id_header.lower().encode("latin-1") if upstream_id_header else None
        self.key = settings.api_key.encode() if settings.api_key else None
        self.allowed_origins = {o.rstrip("/").lower() for o in settings.allowed_origins}
        self.open = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        upstream = self.upstream_id(scope)
        token = request_id.set(upstream or new_request_id())
        if upstream:
            send = _without_id_header(send)
        record = AccessRecord(scope, request_id.get())
        send, receive = record.wrap_send(send), record.wrap_receive(receive)
        failure: BaseException | None = None
        try:
            counted = scope["path"] not in UNCOUNTED_PATHS
            try:
                self.check(scope)
                if counted and self.open >= self.settings.max_connections:
                    raise Refusal(503, "too_many_connections",
                                  f"the server has {self.settings.max_connections} connections open; retry shortly")
            except Refusal as refusal:
                report_failure(self.metrics, refusal.kind, f"{scope['path']}: {refusal.message}", level=logging.WARNING)
                await self.refuse(scope, send, refusal)
                return
            self.open += counted
            try:
                if scope["type"] == "http":
                    await self.serve_http(scope, receive, send)
                else:
                    await self.serve_websocket(scope, receive, send)
            finally:
                self.open -= counted
        except BaseException as err:  # a reply cut after its first bytes, or the client gone (logged by who raised it)
            failure = err
            raise
        finally:
            record.log(failure)
            request_id.reset(token)

    def upstream_id(self, scope) -> str | None:
        if self.upstream_id_header is None:
            return None
        value = dict(scope.get("headers", [])).get(self.upstream_id_header, b"").decode("latin-1")
        return value if UPSTREAM_ID.fullmatch(value) else None

    # -- checks ---------------------------------------------------------------------------------
    def check(self, scope) -> None:
        headers = _headers(scope)
        if self.key is not None and scope["path"] not in UNAUTHENTICATED_PATHS and not self.authorized(headers):
            raise Refusal(401, "unauthorized", "this server needs 'Authorization: Bearer <api key>'")
        if scope["type"] == "websocket" and not self.origin_allowed(headers):
            raise Refusal(403, "forbidden_origin", f"WebSocket from origin {headers['origin']!r} refused; "
                                                   f"the server allows it with --allow-origin")

    def authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        candidates = [given.strip()] if scheme.lower() == "bearer" else []
        candidates += [p[len(KEY_SUBPROTOCOL):] for p in _subprotocols(headers) if p.startswith(KEY_SUBPROTOCOL)]
        # every candidate is compared, so the time taken does not depend on where a match is
        return sum(hmac.compare_digest(c.encode(), self.key) for c in candidates) > 0

    def origin_allowed(self, headers: dict[str, str]) -> bool:
        origin = headers.get("origin")
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        parts = urlsplit(origin)
        return (parts.netloc == headers.get("host", "").lower() or parts.hostname in LOOPBACK_HOSTS
                or origin in self.allowed_origins)

    async def refuse(self, scope, send, refusal: Refusal) -> None:
        body = json.dumps(error_body(refusal.kind, refusal.message)).encode()
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.get().encode())]
        if refusal.status == 503:
            headers.append((b"retry-after", b"1"))
        elif refusal.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if scope["type"] == "http":
            prefix = "http"
        elif "websocket.http.response" in scope.get("extensions", {}):
            prefix = "websocket.http"
        else:  # a server without denial responses: a plain close (its handshake answer is 403)
            await send({"type": "websocket.close", "code": 1013 if refusal.status == 503 else 1008,
                        "reason": refusal.kind})
            return
        await send({"type": f"{prefix}.response.start", "status": refusal.status, "headers": headers})
        await send({"type": f"{prefix}.response.body", "body": body})

    # -- serving ----------------------------------------------------------------------------------
    async def serve_http(self, scope, receive, send) -> None:
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.get().encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ReplyAborted:
            raise  # already reported; propagating it makes the server drop the connection
        except Exception as err:
            report_failure(self.metrics, "internal", f"{scope['method']} {scope['path']}: {err!r}", exc=err)
            if started:
                raise ReplyAborted from err
            body = json.dumps(error_body("internal", "the server failed on this request; "
                                                     "its log has the details under this request id")).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"x-request-id", request_id.get().encode())]})
            await send({"type": "http.response.body", "body": body})

    async def serve_websocket(self, scope, receive, send) -> None:
        socket = _Socket(send, _subprotocols(_headers(scope)))
        self.sockets.add(socket)
        try:
            await self.app(scope, receive, socket.send)
        except Exception as err:
            report_failure(self.metrics, "internal", f"WebSocket {scope['path']}: {err!r}", exc=err)
            await socket.close(1011, "internal error: see the server log under " + request_id.get())
        finally:
            self.sockets.discard(socket)


class OpenSockets(set):
    """The open WebSockets, so the server can close them with a reason when it shuts down."""

    async def close_all(self, code: int, reason: str) -> None:
        for socket in list(self):
            await socket.close(code, reason)


class _Socket:
    """The ASGI ``send`` of one WebSocket: adds ``X-Request-Id`` to the handshake, selects a
    subprotocol for clients that offered some (a browser fails the handshake otherwise), and once the server closed the socket itself (shutdown),
    drops what the session still sends instead of failing it."""

    def __init__(self, send, offered: list[str]) -> None:
        self._send, self.closed, self.accepted = send, False, False
        self.offered = [p for p in offered if not p.startswith(KEY_SUBPROTOCOL)]

    async def send(self, message) -> None:
        if self.closed:
            return
        if message["type"] == "websocket.accept":
            self.accepted = True
            message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.get().encode())]}
            if self.offered and not message.get("subprotocol"):
                message["subprotocol"] = self.offered[0]
        elif message["type"] == "websocket.close":
            self.closed = True
        await self._send(message)

    async def close(self, code: int, reason: str) -> None:
        if self.closed or not self.accepted:
            return
        self.closed = True
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:  # noqa: BLE001 - the client is already gone: nothing to tell it
            pass
