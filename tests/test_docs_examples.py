"""docs/serving.md's quick start runs as written against a live tiny server: its curl line (read
from the file, not copied) returns a PNG and, asked for a size the server does not serve, exits
non-zero with the server's JSON error (curl --fail-with-body); its examples/client.py line writes
a PNG; benchmarks.load names the pipeline it loads and counts its errors by kind with a sample
message; the server logs one access line per request.

The server is `python -m runtime.serve` over the tiny build (tests/fixtures_tiny.py;
$INSTANTRT_TINY_BUILD reuses one), in a subprocess on a free port.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from serve_helpers import wait_process_ready

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "serving.md"


def quick_start(prefix: str) -> list[str]:
    """The first command of docs/serving.md's quick-start block that starts with `prefix`, split as
    the shell would (no continuation lines there)."""
    block = DOC.read_text().split("```", 2)[1]
    line = next(line for line in block.splitlines() if line.startswith(prefix))
    return shlex.split(line.split("  #", 1)[0])


def as_here(command: list[str], photo: Path, out: Path, url: str) -> list[str]:
    """The doc's command with this test's photo, output file and server URL."""
    swap = {"photo.jpg": str(photo), "out.png": str(out), "image=@photo.jpg": f"image=@{photo}",
            "http://127.0.0.1:8000/v1/instantid": f"{url}/v1/instantid"}
    return [swap.get(word, word) for word in command]


@pytest.fixture(scope="module")
def server(tiny_build, tmp_path_factory):
    """(base URL, server log path, folder) of `python -m runtime.serve` over the tiny build."""
    from skimage import data

    folder = tmp_path_factory.mktemp("docs_examples")
    Image.fromarray(data.astronaut()).save(folder / "photo.jpg")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, log = f"http://127.0.0.1:{port}", folder / "server.log"
    with log.open("w") as stream:
        process = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--build", str(tiny_build), "--port",
                                    str(port), "--threads", "1", "--warmup-steps", "1"], cwd=REPO, stdout=stream,
                                   stderr=subprocess.STDOUT)
        try:
            wait_process_ready(url, process, log, 240)
            yield url, log, folder
        finally:
            process.terminate()
            process.wait(30)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_example_gets_a_png_and_fails_loudly_on_a_bad_size(server):
    url, log, folder = server
    command = quick_start("curl ")
    assert "--fail-with-body" in command  # a 4xx must not be saved as out.png with exit status 0
    out = folder / "curl.png"
    done = subprocess.run(as_here(command, folder / "photo.jpg", out, url), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert min(Image.open(out).size) >= 64
    bad = [{"width=256": "width=4096", "height=256": "height=4096"}.get(word, word)
           for word in as_here(command, folder / "photo.jpg", folder / "bad.png", url)]
    assert "width=4096" in bad and "height=4096" in bad
    done = subprocess.run(bad, capture_output=True, timeout=120)
    assert done.returncode == 22, done  # curl's "HTTP error" status
    error = json.loads((folder / "bad.png").read_text())["error"]
    assert error["status"] == 422 and "4096x4096" in error["message"] and error["kind"] in (
        "size_out_of_profile", "over_memory", "over_budget")
    access = log.read_text()
    assert re.search(r"POST /v1/instantid 200 [\d.]+ ms", access), access[-2000:]
    assert re.search(r"POST /v1/instantid 422 [\d.]+ ms", access), access[-2000:]
    assert access.count("POST /v1/instantid") == 2  # one line per request (uvicorn's own access log is off)


def test_the_client_example_writes_a_png(server):
    url, _, folder = server
    command = quick_start("python examples/client.py")
    out = folder / "client.png"
    done = subprocess.run([sys.executable, *as_here(command, folder / "photo.jpg", out, url)[1:], "--url", url,
                           "--steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (256, 256)


def test_the_load_generator_names_its_pipeline_and_counts_errors_by_kind(server):
    url, _, folder = server
    done = subprocess.run([sys.executable, "-m", "benchmarks.load", "--url", url, "--pipeline", "instantid",
                           "--image", str(folder / "photo.jpg"), "--width", "4096", "--height", "4096", "--clients",
                           "1", "--seconds", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # every request failed
    assert "pipeline instantid" in done.stderr and f"{url}/v1/instantid" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    kinds = summary["errors_by_kind"]
    assert len(kinds) == 1, kinds
    (kind, entry), = kinds.items()
    assert re.fullmatch(r"422 (size_out_of_profile|over_memory|over_budget)", kind)
    assert entry["count"] == summary["requests"] >= 1 and "4096x4096" in entry["sample"]
