"""A newcomer's mistakes on the runtime's, the server's, the benchmarks' and the client's command
lines: each is ONE `error: ...` line on stderr saying what to do, exit status 2, no traceback;
-v / --verbose keeps the traceback. And every entry point's --help teaches: each flag described,
an example in the epilog.

Every mistake runs through the real entry point (`python -m ...` in a subprocess) over the tiny
build (tests/fixtures_tiny.py; $INSTANTRT_TINY_BUILD reuses one). The subprocesses run three at a
time in one module fixture; the cases refused while parsing load no model.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import re
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cases(build: Path, face: Path, grey: Path, empty: Path, port: int) -> dict[str, tuple[list[str], str]]:
    """name -> (command after the interpreter, regex the error line must match: the hint)."""
    out = str(empty / "out.png")
    gen = ["-m", "runtime", "generate", "--build", str(build), "--face", str(face), "--prompt", "x", "--out", out]
    url = f"http://127.0.0.1:{port}"
    return {
        "steps 0": ([*gen, "--steps", "0"], r"steps=0 is outside 1\.\.150: give a value inside"),
        "steps -3": ([*gen, "--steps", "-3"], r"steps=-3 is outside 1\.\.150"),
        "width without height": ([*gen, "--width", "128"], r"give both width and height"),
        "ip-scale not numbers": ([*gen, "--ip-scale", "0.5,abc"], r"ip_scale.*(preset|number)"),
        "ip-scale wrong count": ([*gen, "--ip-scale", "0.5,0.6,0.7"],
                                 r"--ip-scale has 3 values but this build's UNet has \d+ cross-attention layers: "
                                 r"give one number, or one per layer"),
        "unknown backend": ([*gen, "--backend", "onnx"], r"'onnx' is not a backend: choose one of onnxruntime"),
        "tensorrt without tensorrt": ([*gen, "--backend", "tensorrt"], r"TensorRT.*[Ii]nstall"),
        "missing photo": ([*gen[:6], str(empty / "nope.jpg"), *gen[7:]], r"image file not found: .*check the path"),
        "photo without a face": ([*gen[:6], str(grey), *gen[7:], "--steps", "1"],
                                 r"no face found in the photo: use a photo with one clearly visible face"),
        "build that does not exist": ([*gen[:4], str(empty / "nobuild"), *gen[5:]],
                                      r"manifest\.json not found: export the model first \(python -m export\.build"),
        "folder that is not a build": ([*gen[:4], str(empty), *gen[5:]], r"manifest\.json not found"),
        "4096 px on the CPU": ([*gen, "--width", "4096", "--height", "4096"],
                               r"4096x4096 with 1 image\(s\) needs about [\d.]+ GiB for ONNX Runtime's attention.*ask "
                               r"for at most \d+x\d+"),
        "missing --out": (gen[:-2], r"the following arguments are required: --out \(see python -m runtime generate"),
        "serve: not a build": (["-m", "runtime.serve", "--build", str(empty)], r"not a build directory.*export\.build"),
        "serve: tensorrt without tensorrt": (["-m", "runtime.serve", "--build", str(build), "--backend", "tensorrt"],
                                             r"TensorRT.*[Ii]nstall"),
        "serve: a pipeline the build lacks": (["-m", "runtime.serve", "--build", str(build), "--pipelines",
                                               "instantid,ip-adaptr"], r"--pipelines instantid,ip-adaptr: .* has "
                                              r"instantid, ip-adapter.*choose among them"),
        "benchmarks: missing build": (["-m", "benchmarks", "latency", "--build", str(empty / "nobuild"), "--out",
                                       str(empty / "bench")], r"not a build directory \(no manifest\.json\): build "
                                      r"one with python -m export\.build"),
        "benchmarks: unknown benchmark": (["-m", "benchmarks", "latncy"], r"unknown benchmark 'latncy': choose one"),
        "benchmarks.load: no server": (["-m", "benchmarks.load", "--url", url, "--image", str(face), "--seconds", "1"],
                                       rf"could not reach {url}.*start the server"),
        "client: missing photo": (["examples/client.py", "--face", str(empty / "nope.jpg"), "--prompt", "x", "--out",
                                   out], r"nope\.jpg: no such file"),
        "client: no server": (["examples/client.py", "--url", url, "--face", str(face), "--prompt", "x", "--out", out],
                              rf"could not reach {url}/v1/instantid.*start the server"),
    }


@pytest.fixture(scope="module")
def runs(tiny_build, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Every case run once (three subprocesses at a time): name -> (finished process, hint regex)."""
    from skimage import data

    folder = tmp_path_factory.mktemp("first_hour")
    face, grey, empty = folder / "astronaut.png", folder / "grey.png", folder / "empty"
    empty.mkdir()
    Image.fromarray(data.astronaut()).save(face)
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(grey)
    table = cases(tiny_build, face, grey, empty, free_port())
    table["verbose keeps the traceback"] = (table["ip-scale wrong count"][0] + ["-v"], "")
    table["a good run"] = (table["steps 0"][0][:-2] + ["--steps", "2", "--width", "64", "--height", "64"], "")

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([PY, *command], cwd=REPO, capture_output=True, text=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        done = {name: pool.submit(run, command) for name, (command, _) in table.items()}
    return {name: (future.result(), table[name][1]) for name, future in done.items()}


MISTAKES = list(cases(Path("b"), Path("f"), Path("g"), Path("e"), 1))


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_is_one_error_line(runs, name):
    if name == "tensorrt without tensorrt" and torch.cuda.is_available():
        pytest.skip("a machine with a GPU may have TensorRT")
    process, hint = runs[name]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert process.returncode == 2, process.stderr[-3000:]
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    assert len(errors) == 1, process.stderr[-3000:]
    assert re.search(hint, errors[0]), errors[0]


def test_verbose_keeps_the_traceback(runs):
    process, _ = runs["verbose keeps the traceback"]
    assert process.returncode != 0 and "Traceback (most recent call last)" in process.stderr
    assert "cross-attention layers" in process.stderr.splitlines()[-1]


def test_a_good_run_reports_its_steps_on_one_line(runs):
    """Not a terminal: no bar, one line at the end with the steps and their pace."""
    process, _ = runs["a good run"]
    assert process.returncode == 0, process.stderr[-3000:]
    assert re.search(r"^denoised 2 steps at [\d.]+ s/step \([\d.]+ s with the prompt and image encoding\)$",
                     process.stderr, re.M), process.stderr
    assert "\r" not in process.stderr and "error:" not in process.stderr and "Warning" not in process.stderr


def test_progress_draws_a_bar_on_a_terminal():
    from runtime.console import StepProgress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = StepProgress(stream=stream, width=8)
    for done in range(1, 5):
        progress(done, 4)
    progress.finish()
    text = stream.getvalue()
    assert "\rdenoising [##......] 1/4" in text and "\rdenoising [########] 4/4" in text
    assert text.endswith("\n") and "denoised 4 steps at" in text.splitlines()[-1]


# ---- --help --------------------------------------------------------------------------------------

def _help_of(entry: str) -> str:
    """The --help text of an entry point, run in-process through its own main (or script)."""
    argv = entry.split() + ["--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stopped:
        if argv[0].endswith(".py"):
            sys.argv = [argv[0], *argv[1:]]
            runpy.run_path(str(REPO / argv[0]), run_name="__main__")
        else:
            module = __import__(f"{argv[0]}.__main__" if argv[0] in ("runtime", "runtime.serve", "benchmarks")
                                else argv[0], fromlist=["main"])
            raise SystemExit(module.main(argv[1:]))
    assert stopped.value.code in (0, None)
    return out.getvalue()


HELPS = ["runtime", "runtime generate", "runtime serve", "runtime.serve", "benchmarks", "benchmarks.latency",
         "benchmarks.load", "benchmarks.flops", "benchmarks.report", "examples/client.py"]


@pytest.mark.parametrize("entry", HELPS)
def test_help_teaches(entry, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    text = _help_of(entry)
    examples = text.split("examples:", 1)
    assert len(examples) == 2 and re.search(r"^\s+python (-m \S+|examples/client\.py) ", examples[1], re.M), text
    if entry == "benchmarks":  # the dispatcher lists the sub-benchmarks
        assert all(re.search(rf"^\s+{name}\s+\S", text, re.M) for name in ("latency", "flops", "load", "report"))
        return
    undescribed, lines = [], text.split("\n\n", 1)[1].splitlines()
    for i, line in enumerate(lines):  # an option line without help has no text after it, nor an indented line below
        match = re.match(r"^  (-\S.*?)(\s{2,}\S.*)?$", line)
        if match and not match.group(2) and (i + 1 == len(lines) or not re.match(r"^\s{8,}\S", lines[i + 1])):
            undescribed.append(match.group(1))
    assert not undescribed, f"{entry}: flags without help: {undescribed}"
    for flag in ("--steps", "--port", "--clients", "--url"):  # flags with a default say it
        if f"\n  {flag} " in text:
            after = text.split(f"\n  {flag} ", 1)[1].split("\n  -", 1)[0]
            assert "default" in after, f"{entry}: {flag} hides its default"


def test_help_piped_into_a_reader_that_stops_ends_quietly():
    """`python -m benchmarks --help | head -1`: output into a pipe nobody reads ends quietly, no traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone: every write is a broken pipe
    try:
        writer = subprocess.run([PY, "-m", "benchmarks", "--help"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in writer.stderr and writer.returncode == 141, writer.stderr
