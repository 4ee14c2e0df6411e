"""`python -m runtime.serve` as a subprocess on 127.0.0.1 over the real tiny build (ONNX Runtime):
correct images, health/readiness, metrics, and the bad-input table of docs/serving.md — each bad
input answered with its 4xx and the server still healthy and correct afterwards.

The tiny build is the session's shared export (tests/fixtures_tiny.py, `python -m export.build
--model tiny --stage onnx --precision fp32`); set INSTANTRT_TINY_BUILD to reuse a build directory.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

from serve_helpers import reused_build, wait_process_ready

REPO = Path(__file__).resolve().parents[1]
MAX_BODY_MB = 1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve_build(request) -> Path:
    """The tiny ONNX build: $INSTANTRT_TINY_BUILD, else the session's shared export (fixtures_tiny.py)."""
    return reused_build() or request.getfixturevalue("tiny_onnx_fp32")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(serve_build, tmp_path_factory):
    """`python -m runtime.serve` on a free 127.0.0.1 port; yields the base URL once /readyz is 200."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    command = [sys.executable, "-m", "runtime.serve", "--build", str(serve_build), "--port", str(port),
               "--max-side", "512", "--max-body-mb", str(MAX_BODY_MB), "--warmup-size", "128", "--threads", "1",
               "--max-queue", "2", "--max-batch", "1",
               "--pipelines", "instantid,ip-adapter"]
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(url, process, log, 180)
        yield url
    finally:
        process.terminate()
        process.wait(20)


def encode(rgb: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt)
    return buffer.getvalue()


ASTRONAUT = encode(skimage.data.astronaut())  # one face (REFERENCE.md)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def instantid_json(**fields) -> dict:
    return {"prompt": "a portrait, oil painting", "image": b64(ASTRONAUT), "width": 256, "height": 256,
            "steps": 2, **fields}


def test_instantid_png_of_the_requested_size(server):
    response = httpx.post(server + "/v1/instantid", json=instantid_json(width=320, height=256), timeout=120)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (320, 256) and image.mode == "RGB"
    assert np.asarray(image).std() > 0  # not a blank image


def test_ip_adapter_multipart_equals_the_runtime_pipeline(server, serve_build):
    from runtime.pipelines import IPAdapterPipeline

    cat = encode(skimage.data.chelsea())
    fields = {"prompt": "a cat", "steps": "3", "seed": "5", "scheduler": "euler_a", "ip_scale": "0.7"}
    response = httpx.post(server + "/v1/ip-adapter", files={"image": ("cat.jpg", cat, "image/jpeg")}, data=fields,
                          timeout=120)
    assert response.status_code == 200, response.text
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    pipe = IPAdapterPipeline.from_build(serve_build, "onnxruntime", threads=1)
    size = int(pipe.assets.value("default_resolution", 1024))
    direct = pipe(cat, "a cat", steps=3, seed=5, scheduler="euler_a", ip_scale=0.7, width=size, height=size)[0]
    assert served.shape == (size, size, 3)
    assert np.abs(served.astype(int) - np.asarray(direct).astype(int)).max() <= 1  # PNG is lossless


def test_health_readiness_schema_and_metrics(server):
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server + "/readyz").json()
    assert ready["status"] == "ready" and ready["pipelines"] == ["instantid", "ip-adapter"]
    schema = httpx.get(server + "/v1/schema").json()
    assert "controlnet_scale" in schema["requests"]["instantid"]["properties"]
    assert schema["limits"]["max_side"] == 512
    metrics = httpx.get(server + "/metrics").text
    for name in ("serve_queue_depth", "serve_ready 1.0", "serve_stage_seconds_bucket", "serve_batch_size_bucket",
                 "process_resident_memory_bytes"):
        assert name in metrics


def _two_faces() -> bytes:
    face = skimage.data.astronaut()
    return encode(np.concatenate([face, face[:, ::-1]], axis=1))


def _huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (6000, 5000)).save(buffer, "PNG")  # 30 MP, a few kB on the wire
    return buffer.getvalue()


# name, request kwargs for httpx.post (path, json / files / data / content / headers), status, kind
BAD_INPUTS = [
    ("no face", dict(json=instantid_json(image=b64(encode(skimage.data.chelsea())))), 422, "no_face"),
    ("several faces, face_index beyond them", dict(json=instantid_json(image=b64(_two_faces()), width=512, face_index=5)),
     422, "face_index"),
    ("corrupt image", dict(json=instantid_json(image=b64(os.urandom(2000)))), 422, "bad_image"),
    ("truncated JPEG", dict(json=instantid_json(image=b64(ASTRONAUT[: len(ASTRONAUT) // 2]))), 422, "bad_image"),
    ("empty image", dict(files={"image": ("a.jpg", b"", "image/jpeg")}, data={"prompt": "x"}), 422, "bad_image"),
    ("huge image (30 MP)", dict(json=instantid_json(image=b64(_huge_png()))), 413, "image_too_large"),
    ("wrong content type", dict(content=b"prompt=x", headers={"content-type": "text/plain"}), 415,
     "unsupported_media_type"),
    ("oversized body", dict(json=instantid_json(image=b64(os.urandom(MAX_BODY_MB * 2**20 + 1000)))), 413,
     "body_too_large"),
    ("size outside the served profile", dict(json=instantid_json(width=4096, height=4096)), 422,
     "size_out_of_profile"),
    ("size not a multiple of 64", dict(json=instantid_json(width=100)), 422, "invalid_request"),
    ("only width", dict(json={**instantid_json(), "height": None}), 422, "invalid_request"),
    ("unknown field", dict(json=instantid_json(strength=0.5)), 422, "invalid_request"),
    ("negative steps", dict(json=instantid_json(steps=-3)), 422, "invalid_request"),
    ("NaN scale (multipart)", dict(files={"image": ("a.jpg", ASTRONAUT, "image/jpeg")},
                                   data={"prompt": "x", "ip_scale": "nan"}), 422, "invalid_request"),
    ("Infinity scale (JSON literal)", dict(content=b'{"prompt": "x", "controlnet_scale": Infinity}',
                                           headers={"content-type": "application/json"}), 400, "bad_json"),
    ("NaN per-layer scales", dict(content=b'{"prompt": "x", "ip_scale": [0.5, NaN]}',
                                  headers={"content-type": "application/json"}), 400, "bad_json"),
    ("scale out of range", dict(json=instantid_json(controlnet_scale=-1)), 422, "invalid_request"),
    ("missing image", dict(json={"prompt": "x"}), 422, "missing_image"),
    ("image not base64", dict(json=instantid_json(image="not base64!")), 400, "bad_base64"),
    ("malformed JSON", dict(content=b'{"prompt": ', headers={"content-type": "application/json"}), 400, "bad_json"),
    ("JSON not an object", dict(json=["prompt"]), 400, "bad_json"),
    ("unknown scheduler", dict(json=instantid_json(scheduler="plms")), 422, "invalid_request"),
    ("several images as one body", dict(json=instantid_json(num_images=2)), 422, "invalid_request"),
    ("multipart without boundary", dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
     400, "bad_multipart"),
]


def test_bad_inputs_get_clear_4xx_and_the_server_stays_healthy(server):
    rows = []
    for name, request, status, kind in BAD_INPUTS:
        response = httpx.post(server + "/v1/instantid", timeout=60, **request)
        error = response.json().get("error", {}) if response.headers["content-type"] == "application/json" else {}
        rows.append((name, response.status_code, error.get("kind"), error.get("message", response.text[:200])))
        assert (response.status_code, error.get("kind")) == (status, kind), rows[-1]
        assert len(error["message"]) > 20
    response = httpx.post(server + "/v1/not-a-pipeline", json={"prompt": "x"})
    assert response.status_code == 404
    print("\n".join(f"| {name} | {status} | {kind} | {message} |" for name, status, kind, message in rows))
    assert httpx.get(server + "/healthz").status_code == 200
    assert httpx.get(server + "/readyz").status_code == 200
    good = httpx.post(server + "/v1/instantid", json=instantid_json(), timeout=120)
    assert good.status_code == 200 and Image.open(io.BytesIO(good.content)).size == (256, 256)
    several = httpx.post(server + "/v1/instantid", json=instantid_json(image=b64(_two_faces()), width=512),
                          timeout=120)
    assert several.status_code == 200  # without face_index: the largest face, as InstantID picks
    metrics = httpx.get(server + "/metrics").text
    assert 'serve_errors_total{kind="no_face"} 1.0' in metrics
    assert 'serve_errors_total{kind="body_too_large"} 1.0' in metrics


def test_overload_beyond_the_queue_bound_gets_429_fast(server):
    """Bound: 2 waiting + 1 running. Ten at once: the rest are refused in well under one generation."""
    body = instantid_json(steps=8)
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=12)) as http:
        def post(_):
            start = time.perf_counter()
            status = http.post(server + "/v1/instantid", json=body).status_code
            return status, time.perf_counter() - start

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(post, range(10)))
        statuses = [status for status, _ in results]
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 5 and statuses.count(200) >= 2, statuses
        slowest_refusal = max(seconds for status, seconds in results if status == 429)
        fastest_success = min(seconds for status, seconds in results if status == 200)
        assert slowest_refusal < min(1.0, fastest_success), (slowest_refusal, fastest_success)
        assert http.get(server + "/readyz").status_code == 200


def test_a_batch_of_requests_shares_one_denoising_loop(serve_build):
    """ServedPipeline.run_batch over the real InstantID pipeline: 3 requests with a face run as ONE loop
    (UNet rows stacked) and each equals its own call; the no-face request fails alone; an engine
    batch bound splits the stack into calls that fit it."""
    from runtime.face import NoFaceError
    from runtime.requests import InstantIDRequest
    from runtime.serve.served import load_pipelines

    served = load_pipelines(serve_build, names=["instantid"], threads=1, warmup_size=128)["instantid"]
    pipe = served.pipe
    face, cat = skimage.data.astronaut(), skimage.data.chelsea()
    common = dict(steps=2, guidance=5.0, ip_scale=0.8, controlnet_scale=0.8, width=256, height=256,
                  scheduler="euler")
    payloads = [InstantIDRequest(face, "a portrait", seed=1, **common),
                InstantIDRequest(cat, "a cat", seed=2, **common),
                InstantIDRequest(np.ascontiguousarray(face[:, ::-1]), "an oil painting", seed=3, num_images=2,
                                 **common),
                InstantIDRequest(face, "a sketch", seed=4, **common)]
    rows, run = [], pipe.loop.run

    def counting_run(plan, inputs, *args, **kwargs):
        rows.append(inputs.latents.shape[0])
        return run(plan, inputs, *args, **kwargs)

    pipe.loop.run = counting_run
    try:
        results = list(served.run_batch(None, payloads))
        assert rows == [4]  # 1 + 2 + 1 images of the requests with a face, one loop
        pipe.max_images = lambda settings: 2  # an engine profile of 2 images per call
        rows.clear()
        again = list(served.run_batch(None, payloads))
        assert rows == [1, 2, 1]
    finally:
        del pipe.loop.run
        del pipe.max_images
    assert isinstance(results[1], NoFaceError) and isinstance(again[1], NoFaceError)
    for index in (0, 2, 3):
        alone = pipe(payloads[index])
        assert len(results[index]) == len(alone) == payloads[index].num_images
        for got, chunked, expected in zip(results[index], again[index], alone):
            assert np.abs(np.asarray(got, int) - np.asarray(expected, int)).max() <= 1
            assert np.abs(np.asarray(chunked, int) - np.asarray(expected, int)).max() <= 1


def test_pipelines_of_one_build_share_their_common_sessions(serve_build):
    """Text encoders, VAE decoder and CLIP image encoder are loaded once for all served pipelines."""
    from runtime.serve.served import load_pipelines

    served = load_pipelines(serve_build, names=["instantid", "ip-adapter", "ip-adapter-plus"], threads=1)
    pipes = [served[name].pipe for name in ("instantid", "ip-adapter", "ip-adapter-plus")]
    for component in ("text_encoder", "text_encoder_2", "vae_decoder"):
        assert len({id(getattr(pipe, component)) for pipe in pipes}) == 1, component
    assert pipes[1].image_encoder is pipes[2].image_encoder and pipes[1].unet is not pipes[2].unet
    image = pipes[2](skimage.data.chelsea(), "a cat", steps=1, width=128, height=128)[0]
    assert image.size == (128, 128)


@pytest.mark.parametrize("captures, expected", [(False, 2), (True, 30)], ids=["eager", "cuda-graph"])
def test_warm_up_runs_the_served_step_count_where_the_loop_is_captured(serve_build, monkeypatch, captures, expected):
    """A captured loop is one CUDA graph per step count and size: warming up at the requests' default
    (30 steps) makes the first such request replay; an eager loop needs only every stage run once."""
    from runtime.loop import DenoiseLoop
    from runtime.serve import served

    monkeypatch.setattr(DenoiseLoop, "can_capture", property(lambda self: captures))
    seen = []
    monkeypatch.setattr(served, "warmup_call", lambda pipe, entry, size, steps: seen.append((size, steps)))
    served.load_pipelines(serve_build, "onnxruntime", ["ip-adapter"], threads=1)
    assert seen == [(seen[0][0], expected)]
    seen.clear()
    served.load_pipelines(serve_build, "onnxruntime", ["ip-adapter"], warmup_steps=5, warmup_size=128, threads=1)
    assert seen == [(128, 5)]
