"""How failures reach people: one request id per HTTP request or WebSocket session (the
``X-Request-Id`` header, in every JSON error and in every log line about it), one JSON error shape,
and one place that logs and counts a failure (``zoo_errors_total{kind}``), so that nothing fails
silently and a user's report can be matched to the server's log."""
from __future__ import annotations

import contextvars
import logging
import uuid

from fastapi.responses import JSONResponse

log = logging.getLogger("omni-zoo.server")

# set by serving.security.Guard for each request or WebSocket session; tasks started while
# serving it inherit it (asyncio copies the context)
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex[:20]}"


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message, "request_id": request_id.get()}}


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, message), status, headers=headers)


def report_failure(metrics, kind: str, message: str, *, exc: BaseException | None = None,
                   level: int = logging.ERROR) -> None:
    """Log (with the request id, and the traceback when there is one) and count a failure."""
    metrics.errors.labels(kind).inc()
    log.log(level, "[%s] %s: %s", request_id.get(), kind, message,
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)


class ReplyAborted(Exception):
    """A streamed HTTP reply failed after its first bytes (already logged and counted). Raised out
    of the response body so the server drops the connection without the final chunk: the client
    sees a truncated transfer, never a complete-looking reply."""


class ApiError(Exception):
    """A refusal with an HTTP status and a short machine-readable kind."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None, *,
                 reported: bool = False) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}
        self.reported = reported  # already logged and counted (Service.refuse): not again


class GenerationFailed(Exception):
    """The model failed during a reply (already logged and counted by Service.stream)."""
