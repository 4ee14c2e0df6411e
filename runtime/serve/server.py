"""uvicorn, hardened for hostile clients: a deadline on request headers, and a shutdown that answers
the queue before it waits for the running batch.

    server = build_server(app, "127.0.0.1", 8000, header_timeout_s=10, grace_s=30,
                          before_shutdown=lambda: app.state.serve.begin_shutdown(30))
    server.run()                                  # until SIGTERM / SIGINT or server.should_exit = True

uvicorn has a keep-alive timeout (idle connections between requests) but none for a request whose
headers never complete: a client that opens a connection and sends a header byte now and then
holds it for ever. `HeaderTimeoutProtocol` (uvicorn's h11 protocol) gives each request
`header_timeout_s` from its first byte (or from the connection's opening) to its last header
line, then answers 408 and closes. The body has its own deadline in the app (`--body-timeout-s`).
"""
from __future__ import annotations

import asyncio
from typing import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.serve.access_log import AccessLog

_BODY_408 = (b'{"error": {"status": 408, "kind": "header_timeout", "message": "the request headers did not arrive '
             b'in time: send the whole request at once"}}')
RESPONSE_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(_BODY_408), _BODY_408))


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers (class attribute
    `header_timeout_s`, seconds; set by `header_timeout_protocol`)."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._arm()  # bytes of a request whose headers are not complete: its deadline runs
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        """No request is in progress on this connection (none yet, or the last one was answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.logger.info("closed a connection whose request headers took over %.0f s", self.header_timeout_s)
            self.transport.write(RESPONSE_408)
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class with a header deadline of `seconds`."""
    if seconds <= 0:
        raise ValueError(f"the header timeout must be > 0 s, got {seconds}")
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": float(seconds)})


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that calls `before_shutdown()` (e.g. fail the queued requests with 503) before
    uvicorn stops accepting and waits up to its graceful timeout for the requests in flight."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], None] | None = None):
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets=None) -> None:
        if self.before_shutdown is not None:
            self.before_shutdown()
        await super().shutdown(sockets)


def build_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                 header_timeout_s: float = 10.0, grace_s: float = 30.0,
                 before_shutdown: Callable[[], None] | None = None, access_log: bool = True) -> GracefulServer:
    """A GracefulServer over `app` with the header deadline; `grace_s`: how long a shutdown waits
    for the requests in flight (uvicorn's timeout_graceful_shutdown). access_log: one INFO line per
    request on the logger runtime.serve.access (runtime.serve.access_log; uvicorn's own is off)."""
    config = uvicorn.Config(AccessLog(app) if access_log else app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            http=header_timeout_protocol(header_timeout_s), timeout_graceful_shutdown=grace_s)
    return GracefulServer(config, before_shutdown)
