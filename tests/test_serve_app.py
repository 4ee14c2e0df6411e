"""The HTTP app on a real uvicorn (127.0.0.1) over a stand-in pipeline with the runtime's call
signature: readiness after warm-up, formats, JSON/multipart, overload (429 fast), timeouts (504),
metrics. The same app over the real tiny pipeline: tests/test_serve_tiny.py."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from runtime.face import FaceIndexError, NoFaceError
from runtime.serve.app import ServeConfig, create_app
from runtime.serve.inputs import Limits
from runtime.serve.served import ServedPipeline
from serve_helpers import serve_in_thread, wait_ready


class StandInPipeline:
    """Callable as the runtime pipelines, with their request object; a dark photo has 'no face';
    sleeps `delay` seconds per call."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0

    def __call__(self, request):
        self.calls += 1
        time.sleep(self.delay)
        if request.image.mean() < 5:
            raise NoFaceError("no face found in the photo: use a photo with one clearly visible face")
        if getattr(request, "face_index", None):
            raise FaceIndexError(f"face_index {request.face_index} is out of range: 1 face(s) found in the photo")
        return [Image.new("RGB", (request.width, request.height), (request.seed % 256, request.steps, i))
                for i in range(request.num_images)]


def photo_bytes(value: int = 128, size: int = 96, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def make_app(delay=0.0, warmup_s=0.0, **config):
    limits = Limits(max_body_bytes=config.pop("max_body_bytes", 2**20), max_side=512)
    pipe = StandInPipeline(delay)

    def load():
        return {"instantid": ServedPipeline("instantid", pipe, None, lambda: time.sleep(warmup_s)),
                "ip-adapter": ServedPipeline("ip-adapter", pipe, 128)}

    return create_app(ServeConfig(limits=limits, **config), load), pipe


@pytest.fixture(scope="module")
def server():
    app, pipe = make_app(max_queue=4, max_batch=2, batch_wait_ms=2)
    with serve_in_thread(app) as url:
        wait_ready(url, 30)
        yield url


def test_ready_only_after_warm_up():
    app, _ = make_app(warmup_s=1.0)
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        early = httpx.get(url + "/readyz")
        assert early.status_code == 503 and "warming up instantid" in early.json()["error"]["message"]
        refused = httpx.post(url + "/v1/ip-adapter", json={"prompt": "x", "image": base64.b64encode(
            photo_bytes()).decode()})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        wait_ready(url, 10)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_json_request_returns_the_image_in_the_asked_format(server, fmt):
    body = {"prompt": "a portrait", "image": base64.b64encode(photo_bytes()).decode(), "width": 192,
            "height": 128, "steps": 3, "seed": 7, "format": fmt}
    response = httpx.post(server + "/v1/instantid", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"image/{fmt}"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == fmt.upper() and image.size == (192, 128)
    assert "run=" in response.headers["x-timings-ms"]


def test_multipart_and_json_output_with_several_images(server):
    files = {"image": ("face.jpg", photo_bytes(fmt="JPEG"), "image/jpeg")}
    data = {"prompt": "a cat", "num_images": "2", "output": "json", "ip_scale": "0.5", "seed": "3"}
    response = httpx.post(server + "/v1/ip-adapter", files=files, data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pipeline"] == "ip-adapter" and body["seed"] == 3 and len(body["images"]) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(item["data"]))) for item in body["images"]]
    assert all(image.size == (128, 128) for image in images)  # the pipeline's default size
    assert set(body["timings_ms"]) == {"decode", "queue", "run", "encode", "total"}


def test_pipeline_errors_are_4xx_and_counted_by_kind(server):
    dark = base64.b64encode(photo_bytes(0)).decode()
    response = httpx.post(server + "/v1/instantid", json={"prompt": "x", "image": dark, "width": 128, "height": 128})
    assert response.status_code == 422 and response.json()["error"]["kind"] == "no_face"
    response = httpx.post(server + "/v1/ip-adapter-plus", json={"prompt": "x"})
    assert response.status_code == 404 and "instantid" in response.json()["error"]["message"]
    metrics = httpx.get(server + "/metrics").text
    assert 'serve_errors_total{kind="no_face"}' in metrics
    assert 'serve_stage_seconds_bucket{le="0.005",pipeline="instantid",stage="run"}' in metrics
    assert "serve_queue_depth" in metrics and "process_resident_memory_bytes" in metrics


def test_overload_beyond_the_queue_bound_is_refused_fast_and_the_rest_complete():
    app, pipe = make_app(delay=1.0, max_queue=2, max_batch=1)  # 3 admitted requests take >= 3 s
    body = {"prompt": "x", "image": base64.b64encode(photo_bytes()).decode(), "steps": 1}
    with serve_in_thread(app) as url, httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16)) as http:
        wait_ready(url, 10)

        def post(_):
            start = time.perf_counter()
            response = http.post(url + "/v1/ip-adapter", json=body)
            return response.status_code, time.perf_counter() - start

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(post, range(12)))
        statuses = sorted(status for status, _ in results)
        assert statuses.count(200) >= 3 and statuses.count(429) >= 6, statuses
        assert set(statuses) <= {200, 429}
        assert max(seconds for status, seconds in results if status == 429) < 1.5  # answered, not queued
        assert http.get(url + "/healthz").status_code == 200
        assert http.post(url + "/v1/ip-adapter", json=body).status_code == 200
        assert 'serve_errors_total{kind="queue_full"}' in http.get(url + "/metrics").text


def test_timeout_answers_504_and_skips_the_work():
    app, pipe = make_app(delay=1.0, max_queue=4, max_batch=1)
    body = {"prompt": "x", "image": base64.b64encode(photo_bytes()).decode(), "steps": 1}
    with serve_in_thread(app) as url:
        wait_ready(url, 10)
        slow = threading.Thread(target=httpx.post, args=(url + "/v1/ip-adapter",), kwargs={"json": body})
        slow.start()
        time.sleep(0.1)
        start = time.perf_counter()
        response = httpx.post(url + "/v1/ip-adapter", json={**body, "timeout_s": 0.2})
        assert response.status_code == 504 and response.json()["error"]["kind"] == "timeout"
        assert time.perf_counter() - start < 0.9  # its deadline, not after the 1 s job ahead of it
        slow.join()
        time.sleep(0.1)
        assert pipe.calls == 1  # the timed-out request never reached the pipeline


def test_cli_refuses_a_folder_that_is_not_a_build(tmp_path, capsys):
    from runtime.serve.__main__ import main

    assert main(["--build", str(tmp_path)]) == 2
    assert "python -m export.build" in capsys.readouterr().err


def test_server_sent_events_queued_started_done(server):
    body = {"prompt": "x", "image": base64.b64encode(photo_bytes()).decode(), "width": 128, "height": 64}
    response = httpx.post(server + "/v1/instantid", json=body, headers={"accept": "text/event-stream"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n") for block in response.text.strip().split("\n\n")]
    assert [lines[0] for lines in events] == ["event: queued", "event: started", "event: done"]
    done = json.loads(events[-1][1].removeprefix("data: "))
    assert Image.open(io.BytesIO(base64.b64decode(done["images"][0]["data"]))).size == (128, 64)
    dark = {**body, "image": base64.b64encode(photo_bytes(0)).decode()}
    counted = metrics_sample(server, 'serve_requests_total{pipeline="instantid",status="422"}')
    failed = httpx.post(server + "/v1/instantid", json=dark, headers={"accept": "text/event-stream"})
    assert failed.text.strip().split("\n\n")[-1].startswith("event: error\ndata: {\"status\": 422")
    # a stream's answer is counted by how it ended, not by its 200 header
    assert metrics_sample(server, 'serve_requests_total{pipeline="instantid",status="422"}') == counted + 1


def metrics_sample(url: str, sample: str) -> float:
    """One Prometheus sample's value (0 when absent)."""
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(sample + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_request_whose_client_hung_up_never_reaches_the_pipeline():
    app, pipe = make_app(delay=2.0, max_queue=4, max_batch=1)  # the server checks for hang-ups every 0.5 s
    body = {"prompt": "x", "image": base64.b64encode(photo_bytes()).decode(), "steps": 1}
    with serve_in_thread(app) as url:
        wait_ready(url, 10)
        busy = threading.Thread(target=httpx.post, args=(url + "/v1/ip-adapter",), kwargs={"json": body})
        busy.start()
        time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/ip-adapter", json=body, timeout=0.3)  # gives up while queued
        busy.join()
        time.sleep(0.3)
        assert pipe.calls == 1
        metrics = httpx.get(url + "/metrics").text
        assert 'serve_errors_total{kind="client_closed"} 1.0' in metrics


def test_load_generator_report(server, tmp_path):
    from benchmarks.load import main

    image = tmp_path / "face.png"
    image.write_bytes(photo_bytes())
    out = tmp_path / "load.json"
    status = main(["--url", server, "--clients", "2", "--seconds", "1", "--pipeline", "instantid", "--image",
                   str(image), "--width", "64", "--height", "64", "--sample-s", "0.2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert status == 0 and report["errors"] == 0 and report["ok"] == report["requests"] > 0
    assert report["answers_by_status"] == {"200": report["ok"]} and report["latency_ms"]["p99"] > 0
    assert report["rss_mb"]["samples"] and report["rss_mb"]["end"] > 10


def test_request_errors_raised_while_preparing_are_the_clients_422():
    """A RequestError (a field out of bounds found while a request is prepared) is the client's mistake."""
    from runtime.requests import RequestError, ResolutionError
    from runtime.serve.app import classify

    assert classify(RequestError("ip_scale block 'down.block_9' does not exist")) == (
        422, "invalid_request", "ip_scale block 'down.block_9' does not exist")
    assert classify(ResolutionError("4096x4096 is outside"))[:2] == (422, "invalid_request")
    assert classify(KeyError("x"))[:2] == (500, "internal")
