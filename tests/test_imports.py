"""What importing the build-directory contract costs: the runtime imports engine.manifest, engine.cache
and engine.tensors at the top of its modules, so they must not pull in the TensorRT builder, progress
bars, diffusers or transformers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorrt", "tensorrt_rtx", "tqdm", "diffusers", "transformers")


def _loaded(modules: str, packages: tuple[str, ...]) -> list[str]:
    """Top-level packages among `packages` that a fresh interpreter has loaded after `import modules`."""
    code = (f"import sys, {modules}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({packages!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout)  # a printed list of names


@pytest.mark.parametrize("modules", ["engine.manifest", "engine.cache", "runtime"])
def test_contract_imports_are_light(modules):
    assert _loaded(modules, HEAVY) == []


@pytest.mark.parametrize("modules", ["runtime.sessions", "runtime.assets"])
def test_runtime_modules_load_no_builder(modules):
    """tqdm aside: torch imports it itself (torch.hub)."""
    assert _loaded(modules, tuple(name for name in HEAVY if name != "tqdm")) == []


def test_tensor_vocabulary_needs_only_the_standard_library():
    assert _loaded("engine.tensors", HEAVY + ("torch", "numpy", "onnx", "onnxruntime")) == []
    assert _loaded("engine.manifest", ("torch", "onnx", "onnxruntime")) == []


def test_runtime_sessions_do_not_need_onnx():
    assert _loaded("runtime.sessions, runtime.trt, runtime.ort", ("onnx",)) == []
