"""runtime.sessions: ONNX Runtime sessions (fp32 and fp16 graphs), feed checks, torch sessions, and the
TensorRT session's load-time refusals that a CPU-only machine can check (corrupt / mismatched plans)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnx.helper as oh
import pytest
import torch

from runtime.sessions import (
    OrtSession,
    SessionError,
    ShapeRangeError,
    TensorInfo,
    TorchSession,
    check_shape,
    normalize_backend,
    open_session,
)

REPO = Path(__file__).resolve().parents[1]


def _affine_onnx(path: Path, dtype: int = onnx.TensorProto.FLOAT) -> Path:
    """y = x * 2 + bias, x (batch, 4) of `dtype`; plus an int64 passthrough `ids` (batch, 3) -> `ids_out`."""
    two = oh.make_tensor("two", dtype, [1], [2.0])
    bias = oh.make_tensor("bias", dtype, [4], [0.5, -1.0, 0.0, 3.0])
    graph = oh.make_graph(
        [oh.make_node("Mul", ["x", "two"], ["scaled"]), oh.make_node("Add", ["scaled", "bias"], ["y"]),
         oh.make_node("Identity", ["ids"], ["ids_out"])],
        "affine",
        [oh.make_tensor_value_info("x", dtype, ["batch", 4]),
         oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", 3])],
        [oh.make_tensor_value_info("y", dtype, ["batch", 4]),
         oh.make_tensor_value_info("ids_out", onnx.TensorProto.INT64, ["batch", 3])],
        initializer=[two, bias])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_ort_session_fp32(tmp_path):
    session = OrtSession(_affine_onnx(tmp_path / "affine.onnx"))
    assert session.input_names == ("x", "ids") and session.output_names == ("y", "ids_out")
    assert session.input("x") == TensorInfo("x", torch.float32, ("batch", 4))
    assert not session.capturable and session.device.type == "cpu"
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    out = session.run({"x": x, "ids": torch.ones(2, 3, dtype=torch.int64)})
    torch.testing.assert_close(out["y"], x * 2 + torch.tensor([0.5, -1.0, 0.0, 3.0]))
    assert out["ids_out"].dtype == torch.int64


def test_ort_session_fp16_graph_takes_fp32_tensors(tmp_path):
    session = OrtSession(_affine_onnx(tmp_path / "affine16.onnx", onnx.TensorProto.FLOAT16))
    assert session.input("x").dtype == torch.float16
    x = torch.rand(3, 4, dtype=torch.float32)
    out = session.run({"x": x, "ids": torch.zeros(3, 3, dtype=torch.int64)})
    assert out["y"].dtype == torch.float16
    torch.testing.assert_close(out["y"].float(), (x.half() * 2 + torch.tensor([0.5, -1.0, 0.0, 3.0]).half()).float())


def test_feed_errors_name_what_is_expected(tmp_path):
    session = OrtSession(_affine_onnx(tmp_path / "affine.onnx"))
    with pytest.raises(SessionError, match=r"missing inputs \['ids'\]"):
        session.run({"x": torch.zeros(1, 4)})
    with pytest.raises(SessionError, match=r"unknown inputs \['z'\]"):
        session.run({"x": torch.zeros(1, 4), "ids": torch.zeros(1, 3, dtype=torch.int64), "z": torch.zeros(1)})
    with pytest.raises(ShapeRangeError, match="axis 1 is 5, the model needs 4"):
        session.run({"x": torch.zeros(1, 5), "ids": torch.zeros(1, 3, dtype=torch.int64)})
    with pytest.raises(SessionError, match="not found: export it first"):
        OrtSession(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(SessionError, match="cannot load"):
        OrtSession(tmp_path / "garbage.onnx")


def test_check_shape_against_a_range():
    info = TensorInfo("sample", torch.float16, ("2B", 4, "latent_height", "latent_width"), (2, 4, 64, 64),
                      (8, 4, 192, 192))
    check_shape("unet", info, (2, 4, 128, 96))
    with pytest.raises(ShapeRangeError, match=r"outside the engine's range \[2, 4, 64, 64\]..\[8, 4, 192, 192\]"):
        check_shape("unet", info, (2, 4, 32, 32))
    with pytest.raises(ShapeRangeError, match="expected rank 4"):
        check_shape("unet", info, (2, 4, 32))


def test_torch_session_runs_a_module_with_engine_io():
    module = torch.nn.Linear(4, 2)
    session = TorchSession(module, [TensorInfo("x", torch.float32, ("batch", 4))],
                           [TensorInfo("y", torch.float32, ("batch", 2))], name="linear")
    x = torch.rand(3, 4, dtype=torch.float64)
    out = session.run({"x": x})
    torch.testing.assert_close(out["y"], module(x.float()).detach())
    assert not session.capturable  # CPU


def test_backend_names():
    assert normalize_backend("ORT") == "onnxruntime"
    assert normalize_backend("tensorrt_rtx") == "tensorrt-rtx"
    with pytest.raises(SessionError, match="unknown backend 'openvino'"):
        normalize_backend("openvino")


# ---- TensorRT: refusals that need no GPU ------------------------------------------------------

@pytest.fixture(scope="module")
def rtx_build(tmp_path_factory):
    """A build directory with one component ('affine') exported and built by TensorRT-RTX on the CPU."""
    pytest.importorskip("tensorrt_rtx")
    from engine.backend import load_backend
    from engine.build import build_engine
    from engine.manifest import record_onnx, update_manifest
    from engine.profiles import ShapeRange

    build = tmp_path_factory.mktemp("rtx_build") / "tiny"
    (build / "onnx").mkdir(parents=True)
    (build / "engines").mkdir()
    onnx_path = _affine_onnx(build / "onnx" / "affine.onnx")
    record_onnx(build, "tiny", "affine", onnx_path)
    backend = load_backend("tensorrt-rtx")
    profile = {"x": ShapeRange((1, 4), (2, 4), (4, 4)), "ids": ShapeRange((1, 3), (2, 3), (4, 3))}
    record = build_engine(onnx_path, build / "engines" / "affine.plan", [profile], backend)
    record = dataclasses.replace(record, path="engines/affine.plan")

    def change(manifest):
        manifest.components["affine"].engine = record

    update_manifest(build, "tiny", change)
    return build


def _copy(build: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tiny"
    shutil.copytree(build, target)
    return target


def test_trt_session_refuses_a_corrupt_plan(rtx_build, tmp_path):
    from engine.cache import EngineCheckError

    build = _copy(rtx_build, tmp_path)
    plan = build / "engines" / "affine.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineCheckError, match="corrupt: its sha256 does not match.*Rebuild it: python -m engine .* --components affine --backend tensorrt-rtx .*--force"):
        open_session(build, "affine", "tensorrt-rtx")
    plan.write_bytes(bytes(data[:100]))
    with pytest.raises(EngineCheckError, match="truncated or corrupt"):
        open_session(build, "affine", "tensorrt-rtx")


def test_trt_session_refuses_another_backend_version(rtx_build, tmp_path):
    from engine.cache import EngineCheckError

    build = _copy(rtx_build, tmp_path)
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["components"]["affine"]["engine"]["backend_version"] = "0.0.1"
    (build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineCheckError, match="plans only load in the exact version that built them"):
        open_session(build, "affine", "tensorrt-rtx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_trt_session_without_a_gpu_says_to_use_onnxruntime(rtx_build):
    with pytest.raises(SessionError, match="only on an NVIDIA GPU.*backend='onnxruntime'"):
        open_session(rtx_build, "affine", "tensorrt-rtx")
    # the ONNX of the same build still runs
    out = open_session(rtx_build, "affine", "onnxruntime").run({"x": torch.ones(1, 4),
                                                                 "ids": torch.zeros(1, 3, dtype=torch.int64)})
    assert out["y"].shape == (1, 4)


def test_missing_component_and_engine(rtx_build):
    with pytest.raises(SessionError, match="has no component 'unet'"):
        open_session(rtx_build, "unet", "onnxruntime")


def test_runtime_imports_neither_diffusers_nor_transformers():
    code = ("import sys, runtime, runtime.pipelines, runtime.sessions, runtime.loop, runtime.__main__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_device_memory_pool_is_shared_and_grows():
    """Every context gets the one buffer; a bigger context grows it and re-points the others."""
    from runtime.sessions import DeviceMemoryPool

    class Context:
        def set_device_memory(self, address, size):
            self.memory = (address, size)

    pool = DeviceMemoryPool("cpu")  # the bookkeeping is device-independent
    small, big, medium = Context(), Context(), Context()
    pool.attach(small, 100)
    pool.attach(big, 300)
    pool.attach(medium, 200)
    assert pool.generation == 2 and pool.buffer.numel() == 300
    assert small.memory == big.memory == medium.memory == (pool.buffer.data_ptr(), 300)
