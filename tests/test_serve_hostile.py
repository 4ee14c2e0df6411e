"""The HTTP server on 127.0.0.1 over the real tiny build (ONNX Runtime) against hostile or unlucky
clients: slow uploads and slow headers are cut off while valid requests still get 200; requests
that time out or whose client leaves free their queue slot at once and stop their run between
denoising steps; a build whose face detector is broken is never ready and no answer shows a server
path; a start-up that cannot succeed exits non-zero; SIGTERM answers the queue 503 and lets the
running request finish; a client that leaves mid-upload is a 499.

In-thread servers (`serve_in_thread`) where possible; `python -m runtime serve` subprocesses for
exit codes and SIGTERM. Every wait is bounded.
"""
from __future__ import annotations

import base64
import io
import json
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

from runtime.serve.app import ServeConfig, create_app
from runtime.serve.inputs import Limits
from serve_helpers import reused_build, serve_in_thread, wait_process_ready, wait_ready

REPO = Path(__file__).resolve().parents[1]
SLOW_S = 2.0  # the module server's header and body deadlines

pytestmark = pytest.mark.slow


def encode(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG")
    return buffer.getvalue()


CAT = base64.b64encode(encode(skimage.data.chelsea())).decode()


def ip_json(**fields) -> dict:
    return {"prompt": "a cat", "image": CAT, "steps": 1, "width": 128, "height": 128, **fields}


@pytest.fixture(scope="module")
def build(request) -> Path:
    return reused_build() or request.getfixturevalue("tiny_build")


@pytest.fixture(scope="module")
def server(build):
    """IP-Adapter on an in-thread server: 2 waiting + 1 running, header and body deadlines of 2 s."""
    from runtime.serve.served import load_pipelines

    config = ServeConfig(max_queue=2, max_batch=1, body_timeout_s=SLOW_S, limits=Limits(max_side=512))
    app = create_app(config, lambda: load_pipelines(build, names=["ip-adapter"], threads=1, warmup_size=128,
                                                    warmup_steps=1))
    with serve_in_thread(app, header_timeout_s=SLOW_S) as url:
        wait_ready(url, 120)
        yield url


def metric(url: str, sample: str) -> float:
    """The value of one Prometheus sample line (0 when absent), e.g. 'serve_errors_total{kind="x"}'."""
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def queue_depth(url: str) -> int:
    return httpx.get(url + "/readyz", timeout=5).json()["queue_depth"]


def wait_running(url: str, timeout_s: float = 10.0) -> None:
    """Until the worker runs a request (/readyz 'running')."""
    deadline = time.monotonic() + timeout_s
    while not httpx.get(url + "/readyz", timeout=5).json()["running"]:
        assert time.monotonic() < deadline, "no request started running"
        time.sleep(0.05)


def raw_request(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def connect(url: str) -> socket.socket:
    address = urlparse(url)
    return socket.create_connection((address.hostname, address.port), timeout=5)


def test_slow_uploads_and_slow_headers_are_cut_off_while_valid_requests_get_200(server):
    """5 clients upload a body 1 byte per 0.3 s, 5 send header bytes as slowly: each gets a 408 and
    its connection closed after about SLOW_S; meanwhile 3 valid requests (queue bound: 2) get 200."""
    before = metric(server, 'serve_errors_total{kind="body_timeout"}')
    slow_body = [connect(server) for _ in range(5)]
    for sock in slow_body:
        sock.sendall(b"POST /v1/ip-adapter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")
    slow_headers = [connect(server) for _ in range(5)]
    for sock in slow_headers:
        sock.sendall(b"POST /v1/ip-adapter HTTP/1.1\r\nHost: x\r\n")
    statuses: list[int] = []

    def valid() -> None:
        for _ in range(3):
            statuses.append(httpx.post(server + "/v1/ip-adapter", json=ip_json(), timeout=30).status_code)

    client = threading.Thread(target=valid)
    started = time.monotonic()
    client.start()
    answers = {sock: b"" for sock in slow_body + slow_headers}
    closed_after: dict[socket.socket, float] = {}
    while len(closed_after) < len(answers) and time.monotonic() - started < 4 * SLOW_S + 2:
        open_now = [sock for sock in answers if sock not in closed_after]
        for sock in select.select(open_now, [], [], 0.3)[0]:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            answers[sock] += data
            if not data:
                closed_after[sock] = time.monotonic() - started
        for sock in open_now:
            if sock not in closed_after:
                try:
                    sock.sendall(b" " if sock in slow_body else b"X")
                except OSError:
                    pass  # closed by the server: its answer is read above
    client.join(60)
    for sock in answers:
        sock.close()
    print(f"slow connections closed after {min(closed_after.values(), default=0):.2f}-"
          f"{max(closed_after.values(), default=0):.2f} s; valid requests: {statuses}")
    assert statuses == [200, 200, 200]
    assert len(closed_after) == 10, f"{10 - len(closed_after)} slow connections still open"
    assert max(closed_after.values()) < 2 * SLOW_S + 1.5, closed_after.values()
    for sock in slow_body:
        assert answers[sock].startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answers[sock], answers[sock][:300]
    for sock in slow_headers:
        assert answers[sock].startswith(b"HTTP/1.1 408") and b'"header_timeout"' in answers[sock], answers[sock][:300]
    assert metric(server, 'serve_errors_total{kind="body_timeout"}') - before == 5


def test_requests_that_time_out_or_are_abandoned_free_their_slot_at_once(server):
    """While a long run holds the worker: a 504 and two clients that give up leave the queue empty
    at once (readyz depth 0), the next request is queued (not 429); when the long run's client
    leaves too, the worker stops it between steps and serves the next one."""
    before = {reason: metric(server, f'serve_dropped_total{{reason="{reason}"}}') for reason in ("deadline", "cancelled")}
    closed_before = metric(server, 'serve_requests_total{pipeline="ip-adapter",status="499"}')
    long_run = connect(server)
    long_run.sendall(raw_request("/v1/ip-adapter", ip_json(steps=150, width=512, height=512)))  # 15-35 s of work
    wait_running(server)
    start = time.monotonic()
    late = httpx.post(server + "/v1/ip-adapter", json=ip_json(timeout_s=0.5), timeout=10)
    assert late.status_code == 504 and late.json()["error"]["kind"] == "timeout"
    print(f"timeout_s 0.5: 504 after {time.monotonic() - start:.2f} s, then queue depth {queue_depth(server)}")
    assert time.monotonic() - start < 1.5
    assert queue_depth(server) == 0  # the 504's slot is free at once

    def give_up() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server + "/v1/ip-adapter", json=ip_json(), timeout=0.6)

    quitters = [threading.Thread(target=give_up) for _ in range(2)]
    for thread in quitters:
        thread.start()
    for thread in quitters:
        thread.join(10)
    deadline = time.monotonic() + 3
    while queue_depth(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"two queued clients gave up: queue depth 0 {time.monotonic() - deadline + 3:.2f} s after they left")
    assert queue_depth(server) == 0  # within ~0.5 s of the clients leaving
    answer: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answer.append(
        httpx.post(server + "/v1/ip-adapter", json=ip_json(), timeout=60)))
    waiting.start()
    time.sleep(0.5)
    assert queue_depth(server) == 1  # queued behind the long run, not refused
    left_at = time.monotonic()
    long_run.close()  # its client leaves: the run stops at its next step
    waiting.join(30)
    assert answer and answer[0].status_code == 200, answer
    print(f"long run's client left: the next request answered {time.monotonic() - left_at:.2f} s later")
    assert time.monotonic() - left_at < 2.5  # not the ~10 s left of the long run
    assert metric(server, 'serve_dropped_total{reason="deadline"}') - before["deadline"] == 1
    assert metric(server, 'serve_dropped_total{reason="cancelled"}') - before["cancelled"] == 2
    assert metric(server, 'serve_requests_total{pipeline="ip-adapter",status="499"}') - closed_before == 3


def test_a_deadline_passed_mid_run_stops_the_worker_within_a_step(server):
    """150 steps at 512x512 take many seconds; with timeout_s=1 the client gets 504 at 1 s and the
    worker is free for the next request within about one step, not after the remaining steps."""
    start = time.monotonic()
    ten = httpx.post(server + "/v1/ip-adapter", json=ip_json(steps=10, width=512, height=512), timeout=60)
    assert ten.status_code == 200
    full_run_s = 15 * (time.monotonic() - start)  # the 150-step run, estimated
    start = time.monotonic()
    late = httpx.post(server + "/v1/ip-adapter", json=ip_json(steps=150, width=512, height=512, timeout_s=1.0),
                      timeout=30)
    assert late.status_code == 504 and time.monotonic() - start < 1.6
    start = time.monotonic()
    nxt = httpx.post(server + "/v1/ip-adapter", json=ip_json(), timeout=60)
    assert nxt.status_code == 200
    waited_ms = float(re.search(r"queue=([\d.]+)", nxt.headers["x-timings-ms"]).group(1))
    print(f"150-step run ~{full_run_s:.1f} s; after its 504 the next request waited {waited_ms:.0f} ms, "
          f"answered in {time.monotonic() - start:.2f} s")
    assert full_run_s > 3.0 and waited_ms < 1000


def test_a_disconnect_during_the_upload_is_a_499(server):
    before = metric(server, 'serve_requests_total{pipeline="ip-adapter",status="499"}')
    kinds_before = metric(server, 'serve_errors_total{kind="client_closed"}')
    sock = connect(server)
    sock.sendall(b"POST /v1/ip-adapter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n" + b'{"prompt": "' + b"x" * 1000)
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 3
    while metric(server, 'serve_requests_total{pipeline="ip-adapter",status="499"}') == before:
        assert time.monotonic() < deadline, "the upload's disconnect was not counted as 499"
        time.sleep(0.1)
    assert metric(server, 'serve_errors_total{kind="client_closed"}') - kinds_before == 1
    assert metric(server, 'serve_requests_total{pipeline="ip-adapter",status="500"}') == 0


def test_a_build_with_a_broken_face_detector_is_never_ready_and_leaks_no_path(build, tmp_path):
    """The InstantID warm-up runs face detection on a real photo: a corrupt detector fails start-up
    (not every request later); /readyz and the 503s say why without any server path."""
    from runtime.serve.served import load_pipelines

    broken = tmp_path / "broken"
    shutil.copytree(build, broken, ignore=shutil.ignore_patterns("weights"))
    (broken / "onnx" / "face_detector.onnx").write_bytes(b"not an ONNX model")
    app = create_app(ServeConfig(), lambda: load_pipelines(broken, names=["instantid"], threads=1,
                                                           warmup_size=128, warmup_steps=1))
    with serve_in_thread(app) as url:
        with pytest.raises(RuntimeError, match="start-up failed"):
            wait_ready(url, 90)
        answers = [httpx.get(url + "/readyz"), httpx.get(url + "/healthz"), httpx.get(url + "/v1/schema"),
                   httpx.post(url + "/v1/instantid", json={"prompt": "x", "image": CAT})]
    assert [a.status_code for a in answers] == [503, 200, 200, 503]
    assert "face_detector" in answers[0].json()["error"]["message"]
    for answer in answers:
        assert str(tmp_path) not in answer.text and str(REPO) not in answer.text, answer.text
        assert not re.search(r"(?<![\w.:/])/(tmp|home|root|work|srv)/", answer.text), answer.text


def serve_command(build: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "runtime", "serve", "--build", str(build), "--port", str(port), "--threads", "1",
            "--warmup-size", "128", "--warmup-steps", "1", *flags]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_start_up_that_cannot_succeed_exits_non_zero(build):
    """A wrong backend or an unknown pipeline: refused before uvicorn starts, one error line and exit
    status 2 (runtime.console), never serving 503."""
    runs = {"backend": ["--backend", "no-such-backend"], "pipeline": ["--pipelines", "no-such-pipeline"]}
    started = time.monotonic()
    processes = {name: subprocess.Popen(serve_command(build, free_port(), *flags), cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True) for name, flags in runs.items()}
    outputs = {name: process.communicate(timeout=60)[0] for name, process in processes.items()}
    elapsed = time.monotonic() - started
    print(f"both exited after {elapsed:.1f} s")
    assert {name: process.returncode for name, process in processes.items()} == {"backend": 2, "pipeline": 2}, outputs
    assert "no-such-backend" in outputs["backend"] and "no-such-pipeline" in outputs["pipeline"]
    assert all(output.startswith("error: ") and output.count("\n") == 1 for output in outputs.values()), outputs
    assert elapsed < 30


def test_sigterm_answers_the_queue_503_and_finishes_the_running_request(build, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "w") as stream:
        process = subprocess.Popen(serve_command(build, port, "--pipelines", "ip-adapter", "--max-queue", "4",
                                                 "--max-batch", "1", "--max-side", "512"),
                                   cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)
    try:
        wait_process_ready(url, process, log, 90, poll_s=0.2)
        answers: dict[str, httpx.Response] = {}

        def post(name: str, **fields) -> threading.Thread:
            thread = threading.Thread(target=lambda: answers.__setitem__(
                name, httpx.post(url + "/v1/ip-adapter", json=ip_json(**fields), timeout=60)))
            thread.start()
            return thread

        threads = [post("running", steps=30, width=512, height=512)]  # a few seconds of work
        wait_running(url)
        threads += [post("queued 1"), post("queued 2")]
        deadline = time.monotonic() + 5
        while queue_depth(url) < 2:
            assert time.monotonic() < deadline, "the two requests were not queued"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert answers["running"].status_code == 200, answers["running"].text
    for name in ("queued 1", "queued 2"):
        assert answers[name].status_code == 503 and answers[name].json()["error"]["kind"] == "shutting_down"


def test_public_messages_hide_server_paths_but_keep_routes():
    from runtime.serve.app import public_message

    assert public_message("cannot open /srv/models/build/onnx/unet.onnx: check it", ("/srv/models/build",)) == \
        "cannot open <build>/onnx/unet.onnx: check it"
    assert public_message("no such file /home/ops/.cache/x/face.onnx") == "no such file face.onnx"
    assert public_message("unknown field 'foo': see GET /v1/schema; probe /readyz") == \
        "unknown field 'foo': see GET /v1/schema; probe /readyz"
