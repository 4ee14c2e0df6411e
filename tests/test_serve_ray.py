"""Ray Serve deployment of the tiny build (CPU replica, ONNX Runtime) on 127.0.0.1: the single-machine
server's app behind serve.ingress (its routes, schema, metrics and 4xx answers), ready as soon as Ray
routes to it, correct images for concurrent requests."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import socket
from pathlib import Path

import httpx
import pytest
import skimage.data
from PIL import Image

from serve_helpers import reused_build

ray = pytest.importorskip("ray", reason="ray[serve] is not installed: pip install -e '.[serve]' for the Ray Serve test")
serve = pytest.importorskip("ray.serve", reason="ray is installed without Serve: pip install 'ray[serve]'")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_build(request) -> Path:
    """The tiny ONNX build: $INSTANTRT_TINY_BUILD, else the session's shared export (fixtures_tiny.py)."""
    return reused_build() or request.getfixturevalue("tiny_onnx_fp32")


@pytest.fixture(scope="module")
def ray_url(serve_build):
    from runtime.serve.ray_app import build_app

    build = serve_build
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"build": str(build), "pipelines": "ip-adapter", "threads": 1, "warmup_size": 128,
                             "max_side": 512}), route_prefix="/", name="instantrt-test")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _png(rgb) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_ray_serve_generates_batches_and_refuses_bad_input(ray_url):
    ready = httpx.get(ray_url + "/readyz", timeout=30)  # serve.run returned: the replica is warm
    assert ready.status_code == 200 and ready.json()["pipelines"] == ["ip-adapter"]
    document = httpx.get(ray_url + "/openapi.json", timeout=30).json()  # the app's own routes, through Ray
    assert "/v1/ip-adapter" in document["paths"] and "/metrics" in document["paths"]
    assert list(httpx.get(ray_url + "/v1/schema", timeout=30).json()["pipelines"]) == ["ip-adapter"]
    body = {"prompt": "a cat", "image": _png(skimage.data.chelsea()), "steps": 2, "width": 128, "height": 192}

    def post(seed: int) -> httpx.Response:
        return httpx.post(ray_url + "/v1/ip-adapter", json={**body, "seed": seed}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(post, range(3)))
    for response in responses:
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (128, 192)
    assert responses[0].content != responses[1].content  # each request kept its own seed
    bad = httpx.post(ray_url + "/v1/ip-adapter", json={**body, "steps": -1, "extra": 1}, timeout=60)
    assert bad.status_code == 422 and "unknown field" in bad.json()["error"]["message"]
    missing = httpx.post(ray_url + "/v1/instantid", json=body, timeout=60)
    assert missing.status_code == 404
    assert post(0).status_code == 200  # still serving
    metrics = httpx.get(ray_url + "/metrics", timeout=30).text
    assert 'serve_requests_total{pipeline="ip-adapter",status="200"} 4.0' in metrics
    assert 'serve_requests_total{pipeline="instantid",status="404"} 1.0' in metrics


def test_a_replica_whose_build_cannot_load_fails_instead_of_serving(ray_url, serve_build):
    """A replica's start-up waits for the app's warm-up: pipelines that cannot load fail the replica
    (and serve.run) instead of a replica Ray routes to that answers 503."""
    from runtime.serve.ray_app import build_app

    with pytest.raises(RuntimeError, match="Deploying application instantrt-broken failed"):
        serve.run(build_app({"build": str(serve_build), "pipelines": "no-such-pipeline", "threads": 1}),
                  route_prefix="/broken", name="instantrt-broken")
    deployment = serve.status().applications["instantrt-broken"].deployments["PipelineDeployment"]
    assert "ASGI lifespan startup failed" in deployment.message
    serve.delete("instantrt-broken")
    assert httpx.get(ray_url + "/readyz", timeout=30).status_code == 200  # the working app is untouched
