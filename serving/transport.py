"""Running the app on uvicorn with time limits on what clients may hold:

- request headers must be complete within ``read_timeout`` of the connection (or of the previous
  response): uvicorn only times out idle keep-alive connections, so a client that sends half its
  headers and stalls would otherwise hold a connection forever (body reads are bounded in
  serving/http_input.py);
- on SIGTERM / Ctrl-C, open WebSockets are closed first with the reason "server shutting down",
  then in-flight replies get ``shutdown_timeout`` seconds to finish before they are cut, so a slow
  client cannot hold the shutdown.

The listening socket is bound by ``bind`` before anything slow happens (server.py binds before
loading the model), so a busy port is one clear error at once; ``serve`` calls ``on_started``
once uvicorn accepts connections on it, and only then does server.py say where it serves.
"""
from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .security import OpenSockets

SHUTDOWN_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5


def bounded_headers_protocol(read_timeout: float) -> type[H11Protocol]:
    class BoundedHeadersProtocol(H11Protocol):
        header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE and self.header_deadline is not None:
                self.header_deadline.cancel()  # the headers are in (or the protocol was switched)
                self.header_deadline = None

        def connection_lost(self, exc) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            self.header_deadline = self.loop.call_later(read_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self.header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return BoundedHeadersProtocol


class PortUnavailable(Exception):
    """The address cannot be listened on; the message says why and what to do, in one line."""


BIND_REASONS = {
    errno.EADDRINUSE: "the port is in use (another server?); stop it or pick another --port",
    errno.EADDRNOTAVAIL: "this machine has no such address; check --host",
    errno.EACCES: "permission denied (ports below 1024 need privileges); pick another --port",
}


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening: connections are refused until
    ``serve`` starts), or PortUnavailable."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise PortUnavailable(f"cannot listen on {host}:{port}: unknown host ({err.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may rebind at once
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        reason = BIND_REASONS.get(err.errno, err.strerror or str(err))
        raise PortUnavailable(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, open_sockets: OpenSockets,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.open_sockets, self.on_started = open_sockets, on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets=None) -> None:
        await self.open_sockets.close_all(1001, "server shutting down")
        await super().shutdown(sockets)


def serve(app, open_sockets: OpenSockets, *, sock: socket.socket, read_timeout: float, ws_max_size: int,
          shutdown_timeout: float = SHUTDOWN_TIMEOUT_S, on_started: Callable[[], None] | None = None) -> None:
    """Serve ``app`` on ``sock`` (from ``bind``) until SIGTERM / Ctrl-C. PortUnavailable when it
    cannot listen after all (another process took the port between ``bind`` and now)."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", ws_max_size=ws_max_size,
                            http=bounded_headers_protocol(read_timeout), timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=shutdown_timeout)
    try:
        GracefulServer(config, open_sockets, on_started).run(sockets=[sock])
    except OSError as err:
        if err.errno not in BIND_REASONS:
            raise
        raise PortUnavailable(f"cannot listen on {host}:{port}: {BIND_REASONS[err.errno]}") from None
