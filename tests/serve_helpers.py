"""HTTP-server test helpers: uvicorn in a thread on 127.0.0.1, readiness polling, a reused tiny build.

    with serve_in_thread(app) as url:           # e.g. 'http://127.0.0.1:41235'
        httpx.get(url + "/healthz")
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0,
                    header_timeout_s: float = 10.0, grace_s: float = 5.0) -> Iterator[str]:
    """Start uvicorn (port 0: a free one) as `python -m runtime.serve` does (header deadline, graceful
    shutdown that first answers the queue), yield the base URL, stop it (lifespan shutdown included)."""
    from runtime.serve.server import build_server

    state = getattr(app.state, "serve", None)
    server = build_server(app, host, port, "warning", header_timeout_s=header_timeout_s, grace_s=grace_s,
                          before_shutdown=None if state is None else lambda: state.begin_shutdown(grace_s))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port} within {start_timeout_s} s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(15)


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll GET /readyz until 200; RuntimeError with the server's reason on timeout."""
    import httpx

    deadline, reason = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        response = httpx.get(url + "/readyz", timeout=5)
        if response.status_code == 200:
            return
        reason = response.text
        if "start-up failed" in reason:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready: {reason}")


def reused_build(env_var: str = "INSTANTRT_TINY_BUILD"):
    """The build directory named by $INSTANTRT_TINY_BUILD when it holds a manifest.json, else None
    (tests then use the session's shared tiny export, tests/fixtures_tiny.py)."""
    import os
    from pathlib import Path

    reuse = os.environ.get(env_var)
    return Path(reuse) if reuse and (Path(reuse) / "manifest.json").is_file() else None


def wait_process_ready(url: str, process, log, timeout_s: float, poll_s: float = 0.25) -> None:
    """Poll GET /readyz of a `python -m runtime serve` subprocess until 200; AssertionError with the
    tail of its `log` (a Path) if it exits or is not ready within `timeout_s`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"server exited {process.returncode}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"server not ready in {timeout_s} s:\n" + log.read_text()[-3000:]
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
