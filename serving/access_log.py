"""One access-log line per request: method, path, status, duration, time to first audio (replies
that carry audio: a response with ``X-Sample-Rate``) and the request id; a WebSocket session gets
one line when it ends, with its duration and how it ended (closed by whom, with which code and
reason, refused at the handshake, or failed). serving/security.py's Guard wraps every request in
an ``AccessRecord``, so refusals are logged too.

    POST /chat 200 2.315s ttfa=0.163s req_1f2e...
    WS /v1/realtime 101 12.040s closed by client 1000 req_9ab0...
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("omni-zoo.access")


class AccessRecord:
    """Watches one request's ASGI messages (``send`` and ``receive`` wrapped) and logs it once."""

    def __init__(self, scope, request_id: str, clock=time.perf_counter) -> None:
        self.websocket = scope["type"] == "websocket"
        self.method = "WS" if self.websocket else scope.get("method", "-")
        self.path, self.request_id, self.clock = scope["path"], request_id, clock
        self.started = clock()
        self.status: int | None = None
        self.audio = False  # the response carries audio: its first body bytes are the first audio
        self.ttfa: float | None = None
        self.closed_by: str | None = None  # "server" or "client"
        self.close_code: int | None = None
        self.close_reason = ""

    def wrap_send(self, send):
        async def watched(message) -> None:
            self.sent(message)
            await send(message)
        return watched

    def wrap_receive(self, receive):
        async def watched():
            message = await receive()
            if message["type"] in ("websocket.disconnect", "http.disconnect") and self.closed_by is None:
                self.closed_by = "client"
                self.close_code = message.get("code")
            return message
        return watched

    def sent(self, message) -> None:
        kind = message["type"]
        if kind in ("http.response.start", "websocket.http.response.start"):
            self.status = message["status"]
            self.audio = any(name.lower() == b"x-sample-rate" for name, _ in message.get("headers", []))
        elif kind == "http.response.body":
            if self.audio and self.ttfa is None and message.get("body"):
                self.ttfa = self.clock() - self.started
        elif kind == "websocket.accept":
            self.status = 101
        elif kind == "websocket.close" and self.closed_by is None:
            self.closed_by, self.close_code = "server", message.get("code", 1000)
            self.close_reason = message.get("reason") or ""

    def line(self, error: BaseException | None = None) -> str:
        parts = [self.method, self.path, str(self.status or "-"), f"{self.clock() - self.started:.3f}s"]
        if self.ttfa is not None:
            parts.append(f"ttfa={self.ttfa:.3f}s")
        parts.append(self.outcome(error))
        parts.append(self.request_id)
        return " ".join(p for p in parts if p)

    def outcome(self, error: BaseException | None) -> str:
        if error is not None:  # the reply was cut (ReplyAborted) or the app failed: logged with a traceback
            return f"failed ({type(error).__name__})"
        if not self.websocket:
            return ""
        if self.status is not None and self.status != 101:
            return "refused"
        if self.closed_by is None:
            return "ended"
        code = "" if self.close_code is None else f" {self.close_code}"
        reason = f" ({self.close_reason})" if self.close_reason else ""
        return f"closed by {self.closed_by}{code}{reason}"

    def log(self, error: BaseException | None = None) -> None:
        log.info("%s", self.line(error))
