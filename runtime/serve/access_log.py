"""One access-log line per HTTP request: method, path, status and time, through the logging module.

    app = AccessLog(app)     # runtime.serve.server.build_server does it (--no-access-log: not)
    # runtime.serve.access INFO  POST /v1/instantid 200 1843.2 ms 127.0.0.1

uvicorn's own access log is off (build_server), so a request is logged once, when its answer has
been sent (or the connection ended without one: status '-'). The time runs from the request's
arrival to the last byte of the answer, queueing and generation included.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("runtime.serve.access")


class AccessLog:
    """Pure ASGI middleware over `app`: logs each HTTP request at INFO on `log`; other scopes
    (lifespan, websockets) pass through untouched."""

    def __init__(self, app, logger: logging.Logger = log):
        self.app, self.log = app, logger

    def __getattr__(self, name):  # app.state and the like stay reachable through the wrapper
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), None
        logged = False

        def write() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            client = scope.get("client")
            self.log.info("%s %s %s %.1f ms%s", scope.get("method", "-"), scope.get("path", "-"),
                          "-" if status is None else status, (time.perf_counter() - start) * 1000,
                          f" {client[0]}" if client else "")

        async def logging_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write()

        try:
            await self.app(scope, receive, logging_send)
        finally:
            write()
