"""Running the app on uvicorn with time limits on what clients may hold:

- request headers must be complete within ``read_timeout`` of the connection (or of the previous
  response): uvicorn only times out idle keep-alive connections, so a client that sends half its
  headers and stalls would otherwise hold a connection forever (body reads are bounded in
  serving/http_input.py);
- on SIGTERM / Ctrl-C, open WebSockets are closed first with the reason "server shutting down",
  then in-flight replies get ``shutdown_timeout`` seconds to finish before they are cut, so a slow
  client cannot hold the shutdown.
"""
from __future__ import annotations

import asyncio

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


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, open_sockets: OpenSockets) -> None:
        super().__init__(config)
        self.open_sockets = open_sockets

    async def shutdown(self, sockets=None) -> None:
        await self.open_sockets.close_all(1001, "server shutting down")
        await super().shutdown(sockets)


def serve(app, open_sockets: OpenSockets, *, host: str, port: int, read_timeout: float, ws_max_size: int,
          shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", ws_max_size=ws_max_size,
                            http=bounded_headers_protocol(read_timeout), timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=shutdown_timeout)
    GracefulServer(config, open_sockets).run()
