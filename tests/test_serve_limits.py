"""The HTTP server's inputs cannot exhaust its memory or crash its parser: `python -m runtime serve` over
the real tiny build on 127.0.0.1, in a subprocess under a data cap (RLIMIT_DATA 5 GiB: private writable
memory; the tiny server holds ~1.2 GB of it, ~0.6 GB resident), so a regression that allocates by
input geometry fails here with a 500 (MemoryError) instead of taking the machine down.

Each hostile input gets its status and kind; afterwards the server is healthy, still answers a valid
request, its resident memory stayed bounded, and it runs a request at the largest size it derived
from its memory (the estimate in runtime/serve/capacity.py holds under the cap).
"""
from __future__ import annotations

import base64
import io
import json
import resource
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
DATA_CAP = 5 * 2**30  # the tiny server: VmData ~1.2 GB after warm-up and requests
RSS_BOUND_MB = 1000  # measured: 542 MB resident when ready, 619 MB after the hostile inputs and two generations
MAX_BODY_MB = 1
MAX_COST = 4.0  # megapixel-steps

pytestmark = pytest.mark.slow


def png(size: tuple[int, int], mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


STRIP = png((100_000, 1))  # 92 bytes: CLIP's shortest-edge resize alone would have made 22,400,000 x 224 px
CAT, FACE = jpeg(skimage.data.chelsea()), jpeg(skimage.data.astronaut())


def ip_json(**fields) -> dict:
    return {"prompt": "a cat", "image": b64(CAT), "steps": 1, "width": 128, "height": 128, **fields}


def face_json(**fields) -> dict:
    return {"prompt": "a portrait", "image": b64(FACE), "steps": 1, "width": 128, "height": 128, **fields}


def raw_json(text: bytes) -> dict:
    return dict(content=text, headers={"content-type": "application/json"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def capped() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_CAP, DATA_CAP))


def vm_mb(pid: int, field: str = "VmRSS") -> float:
    """A /proc/<pid>/status memory figure (VmRSS: resident, VmHWM: peak resident, VmData) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """(url, pid): `python -m runtime serve` under RLIMIT_DATA, max side derived from its memory."""
    build = reused_build() or request.getfixturevalue("tiny_build")
    port = free_port()
    log = tmp_path_factory.mktemp("limits_log") / "server.log"
    command = [sys.executable, "-m", "runtime", "serve", "--build", str(build), "--port", str(port),
               "--warmup-size", "128", "--warmup-steps", "1", "--threads", "1", "--max-batch", "1", "--max-queue",
               "4", "--max-body-mb", str(MAX_BODY_MB), "--max-cost", str(MAX_COST)]
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT, preexec_fn=capped)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(url, process, log, 120)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(20)


def hostile_inputs(limits: dict) -> list[tuple[str, str, dict, int, str, tuple[str, ...]]]:
    """(name, pipeline, httpx.post kwargs, status, kind, texts the message must contain)."""
    side = limits["max_side"]
    return [
        ("100000x1 PNG (92 bytes)", "ip-adapter", dict(json=ip_json(image=b64(STRIP))), 422, "bad_image",
         ("100000x1", "20:1")),
        ("100000x1 PNG", "ip-adapter-plus", dict(json=ip_json(image=b64(STRIP))), 422, "bad_image", ("20:1",)),
        ("100000x1 PNG as image", "instantid", dict(json=face_json(image=b64(STRIP))), 422, "bad_image",
         ("100000x1",)),
        ("100000x1 PNG as pose_image", "instantid", dict(json=face_json(pose_image=b64(STRIP))), 422, "bad_image",
         ("pose_image", "100000x1")),
        ("100000x1 PNG, multipart, no size", "ip-adapter",
         dict(files={"image": ("strip.png", STRIP, "image/png")}, data={"prompt": "x"}), 422, "bad_image",
         ("20:1",)),
        ("17000x1000 PNG (a side over 16384)", "ip-adapter", dict(json=ip_json(image=b64(png((17_000, 1000))))),
         422, "bad_image", ("17000x1000", "16,384")),
        ("6000x5000 PNG (30 MP)", "ip-adapter", dict(json=ip_json(image=b64(png((6000, 5000))))), 413,
         "image_too_large", ("6000x5000 = 30,000,000 pixels", "25,000,000")),
        ("cost over --max-cost", "ip-adapter", dict(json=ip_json(width=512, height=512, steps=20)), 422,
         "over_budget", ("512x512 px x 20 steps x 1 image(s) = 5.0 megapixel-steps", "limit is 4", "lower steps")),
        ("2048x2048 beyond what memory holds", "ip-adapter", dict(json=ip_json(width=2048, height=2048)), 422,
         "size_out_of_profile", (f"64..{side} px", "memory")),
        ("largest side x 4 images", "ip-adapter",
         dict(json=ip_json(width=side, height=side, num_images=4, output="json")), 422, "over_memory",
         ("GiB", "ask for at most")),
        ("JSON 100000 levels deep", "ip-adapter", raw_json(b"[" * 100_000), 400, "bad_json", ("100,000",)),
        ("JSON 5000 levels deep in a field", "ip-adapter",
         raw_json(b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400, "bad_json", ("nested too deeply",)),
        ("duplicate JSON key", "ip-adapter",
         raw_json(json.dumps(ip_json()).encode()[:-1] + b', "steps": 2}'), 400, "duplicate_field", ("'steps'",)),
        ("duplicate multipart field", "ip-adapter",
         dict(files=[("image", ("a.jpg", CAT, "image/jpeg")), ("steps", (None, b"1")), ("steps", (None, b"2")),
                     ("prompt", (None, b"x"))]), 400, "duplicate_field", ("'steps'",)),
        ("steps: true", "ip-adapter", dict(json=ip_json(steps=True)), 422, "invalid_request",
         ("steps", "not true/false")),
        ("ip_scale [0.5, false]", "ip-adapter", dict(json=ip_json(ip_scale=[0.5, False])), 422, "invalid_request",
         ("ip_scale",)),
        ("body over --max-body-mb (Content-Length)", "ip-adapter",
         dict(json=ip_json(image="A" * (MAX_BODY_MB * 2**20 + 4000))), 413, "body_too_large",
         (f"{MAX_BODY_MB * 2**20:,}",)),
        ("body over --max-body-mb (chunked, no length)", "ip-adapter",
         dict(content=iter([b"x" * 2**19] * 3), headers={"content-type": "application/json"}), 413,
         "body_too_large", ("bytes received so far", f"the limit is {MAX_BODY_MB * 2**20:,}")),
        ("unknown field with a 100 kB name", "ip-adapter", dict(json=ip_json(**{"x" * 100_000: 1})), 422,
         "invalid_request", ("unknown field",)),
        ("duplicate key with a 100 kB name", "ip-adapter",
         raw_json(b'{"' + b"k" * 100_000 + b'": 1, "' + b"k" * 100_000 + b'": 2}'), 400, "duplicate_field",
         ("given twice",)),
    ]


def test_hostile_inputs_are_refused_and_the_server_stays_healthy_and_small(server):
    url, pid = server
    limits = httpx.get(url + "/v1/schema").json()["limits"]
    assert limits["max_cost"] == MAX_COST and limits["memory_bytes"] > 0
    assert 256 <= limits["max_side"] <= 1024 and "memory" in limits["max_side_source"], limits
    rss_ready = vm_mb(pid)
    rows = []
    with httpx.Client(timeout=60) as http:
        for name, pipeline, request, status, kind, texts in hostile_inputs(limits):
            start = time.perf_counter()
            response = http.post(f"{url}/v1/{pipeline}", **request)
            seconds = time.perf_counter() - start
            error = response.json().get("error", {}) if response.headers["content-type"] == "application/json" else {}
            message = error.get("message", response.text[:300])
            rows.append(f"| {name} | {response.status_code} {error.get('kind')} | {seconds:.2f} s, "
                        f"{len(response.content)} B: {message[:160]} |")
            assert (response.status_code, error.get("kind")) == (status, kind), rows[-1]
            assert all(text in message for text in texts), (name, message)
            assert len(response.content) <= 2300 and len(message) <= 2000, (name, len(response.content))
            assert seconds < 5, (name, seconds)  # refused, not worked on
        wrapped = base64.encodebytes(CAT).decode()  # coreutils `base64`: 76-character lines
        assert "\n" in wrapped
        good = http.post(url + "/v1/ip-adapter", json=ip_json(image=wrapped))
        rows.append(f"| wrapped base64 (76-character lines) | {good.status_code} | |")
        assert good.status_code == 200 and Image.open(io.BytesIO(good.content)).size == (128, 128)
        assert http.get(url + "/healthz").status_code == 200 and http.get(url + "/readyz").status_code == 200
        face = http.post(url + "/v1/instantid", json=face_json(width=256, height=256, steps=2))
        assert face.status_code == 200, face.text
        rss = vm_mb(pid)
        print(f"\nserver RSS: {rss_ready:.0f} MB ready, {rss:.0f} MB after the hostile inputs and two generations\n"
              + "\n".join(rows))
        assert rss < RSS_BOUND_MB, rss
        side = limits["max_side"]  # the largest size the server said its memory holds: it runs, under the cap
        start = time.perf_counter()
        largest = http.post(url + "/v1/ip-adapter", json=ip_json(width=side, height=side), timeout=120)
        assert largest.status_code == 200, largest.text
        assert Image.open(io.BytesIO(largest.content)).size == (side, side)
        print(f"{side}x{side}, 1 step: 200 in {time.perf_counter() - start:.1f} s, server RSS {vm_mb(pid):.0f} MB, "
              f"peak RSS {vm_mb(pid, 'VmHWM'):.0f} MB, VmData {vm_mb(pid, 'VmData'):.0f} MB (cap {DATA_CAP / 2**20:.0f} MB)")
        assert http.get(url + "/healthz").status_code == 200


def test_clip_preprocessing_refuses_extreme_aspect_ratios_before_allocating():
    from runtime.clip_image import clip_pixel_values
    from runtime.images import ImageError

    for shape in ((1, 100_000, 3), (100_000, 1, 3), (3, 65_000, 3)):
        start = time.perf_counter()
        with pytest.raises(ImageError, match="aspect ratio.*the limit is 20:1"):
            clip_pixel_values(np.zeros(shape, np.uint8))
        assert time.perf_counter() - start < 0.05
    with pytest.raises(ImageError, match="no pixels"):
        clip_pixel_values(np.zeros((0, 10, 3), np.uint8))
    start = time.perf_counter()
    for shape in ((10, 200, 3), (400, 20, 3), (1, 20, 3), (2000, 100, 3)):  # at 20:1: at most 4480 x 224 px
        assert clip_pixel_values(np.zeros(shape, np.uint8)).shape == (1, 3, 224, 224)
    assert time.perf_counter() - start < 1.0


def test_load_image_refuses_long_sides_and_aspect_ratios_from_the_header():
    from runtime.images import ImageError, load_image

    with pytest.raises(ImageError, match="100000x1, an aspect ratio of 100,000:1"):
        load_image(STRIP)
    with pytest.raises(ImageError, match="a side over the limit of 16,384"):
        load_image(png((17_000, 1000)))
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(np.zeros((1, 30, 3), np.uint8))
    assert load_image(png((2000, 100), "RGB")).shape == (100, 2000, 3)  # 20:1 is allowed
    assert load_image(STRIP, max_side=100_000, max_aspect=1e6).shape == (1, 100_000, 3)  # the caller decides


def test_attention_memory_estimate_and_the_largest_square():
    from runtime.serve.capacity import attention_bytes, largest_square

    # SDXL 1024x1024 with CFG: 2 rows x 10 heads x 4096^2 tokens x 4 bytes x 6.5 = 8.7 GB
    assert attention_bytes(1024, 1024, 2, 10) == int(6.5 * 2 * 10 * 4096**2 * 4)
    for memory in (2**30, 12 * 2**30, 100 * 2**30):
        side = largest_square(memory, 2, 10)
        assert side % 64 == 0 and attention_bytes(side, side, 2, 10) <= memory
        assert attention_bytes(side + 64, side + 64, 2, 10) > memory
    assert largest_square(12 * 2**30, 2, 10) == 1088  # 12 GiB for a run: SDXL 2048x2048 (and 1152x1152) refused
