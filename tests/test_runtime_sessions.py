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

from engine.tensors import TensorSpec
from runtime.sessions import (
    OrtSession,
    SessionError,
    ShapeRangeError,
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
    assert session.input("x") == TensorSpec("x", "float32", ("batch", 4))
    assert session.input("x").dtype is torch.float32  # sessions hold torch dtypes
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


def test_ort_binds_feeds_in_place_and_hands_over_outputs(tmp_path):
    """No host round trip: ORT reads the feed's own memory when it runs (a write after binding shows in
    the result), and the returned tensors are the buffers ORT wrote (same addresses)."""
    session = OrtSession(_affine_onnx(tmp_path / "affine.onnx"))
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    binding, bound = session.io_binding({"x": x, "ids": ids})
    # contiguous, of the graph's dtype, on ORT's device: bound where they lie
    assert bound["x"].data_ptr() == x.data_ptr() and bound["ids"].data_ptr() == ids.data_ptr()
    x.mul_(10)
    out = session.run_bound(binding)
    assert torch.equal(out["y"], x * 2 + torch.tensor([0.5, -1.0, 0.0, 3.0])) and torch.equal(out["ids_out"], ids)
    written = binding.get_outputs()
    assert [value.data_ptr() for value in written] == [out[name].data_ptr() for name in session.output_names]
    strided = torch.arange(16, dtype=torch.float32).reshape(2, 8)[:, ::2]  # a view: torch makes it contiguous
    _, bound = session.io_binding({"x": strided, "ids": ids})
    assert bound["x"].is_contiguous() and torch.equal(bound["x"], strided)


def _feeds(session, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Random feeds at base sizes {'batch', 'height', 'width'} and 2 prompt chunks of text tokens (token ids
    < 1000, floats N(0, 1))."""
    from engine.profiles import TEXT_CHUNK, TEXT_TOKENS_AXIS, parse_dim

    sizes = {TEXT_TOKENS_AXIS: 2 * TEXT_CHUNK, **sizes}
    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for info in session.inputs:
        shape = [d if isinstance(d, int) else parse_dim(d).value(sizes[parse_dim(d).base], d) for d in info.shape]
        feeds[info.name] = (torch.randn(shape, generator=generator).to(info.dtype) if info.dtype.is_floating_point
                            else torch.randint(0, 1000, shape, generator=generator).to(info.dtype))
    return feeds


def test_ort_binding_matches_plain_runs_bit_for_bit(tiny_build):
    """Every ONNX component of the tiny build: the bound path gives exactly ONNX Runtime's numpy results."""
    from engine.manifest import load_manifest

    manifest = load_manifest(tiny_build)
    components = [name for name, entry in manifest.components.items() if entry.onnx is not None]
    compared = []
    for index, name in enumerate(components):
        session = open_session(tiny_build, name, "onnxruntime", manifest=manifest, threads=1)
        if any(d is None for info in session.inputs for d in info.shape):
            continue  # an unnamed dynamic axis (no contract graph has one)
        feeds = _feeds(session, {"batch": 1, "height": 64, "width": 64}, seed=index)
        out = session.run(feeds)
        plain = session._session.run(list(session.output_names), {k: v.numpy() for k, v in feeds.items()})
        for output, expected in zip(session.output_names, plain):
            assert out[output].dtype == torch.from_numpy(expected).dtype
            assert torch.equal(out[output], torch.from_numpy(expected)), f"{name}.{output}"
        compared.append(name)
    assert {"unet_instantid", "controlnet", "vae_decoder", "text_encoder_2", "arcface"} <= set(compared)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and onnxruntime-gpu")
def test_ort_cuda_binding_stays_on_the_gpu(tmp_path):
    """CUDA execution provider: feeds bound at their device addresses, outputs ORT's device buffers; a feed
    written on a side stream right before the call is complete when ORT reads it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA execution provider")
    session = OrtSession(_affine_onnx(tmp_path / "affine.onnx"))
    assert session.ort_device.type == "cuda" and session.device == session.ort_device
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.ones(4096, 4, device=session.device)
        for _ in range(50):  # keep the stream busy so a missing sync would read unfinished values
            x = x * 1.0001
        ids = torch.arange(4096 * 3, device=session.device).reshape(4096, 3)
        binding, bound = session.io_binding({"x": x, "ids": ids})
        out = session.run_bound(binding)
    assert bound["x"].data_ptr() == x.data_ptr() and out["y"].device == x.device
    assert [v.data_ptr() for v in binding.get_outputs()] == [out[n].data_ptr() for n in session.output_names]
    torch.cuda.synchronize()
    reference = x.cpu() * 2 + torch.tensor([0.5, -1.0, 0.0, 3.0])
    assert torch.equal(out["y"].cpu(), reference) and torch.equal(out["ids_out"].cpu(), ids.cpu())


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
    info = TensorSpec("sample", torch.float16, ("2B", 4, "latent_height", "latent_width"), min=(2, 4, 64, 64),
                      max=(8, 4, 192, 192))
    check_shape("unet", info, (2, 4, 128, 96))
    with pytest.raises(ShapeRangeError, match=r"outside the engine's range \[2, 4, 64, 64\]..\[8, 4, 192, 192\]"):
        check_shape("unet", info, (2, 4, 32, 32))
    with pytest.raises(ShapeRangeError, match="expected rank 4"):
        check_shape("unet", info, (2, 4, 32))


def test_torch_session_runs_a_module_with_engine_io():
    module = torch.nn.Linear(4, 2)
    session = TorchSession(module, [TensorSpec("x", "float32", ("batch", 4))],
                           [TensorSpec("y", torch.float32, ("batch", 2))], name="linear")
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
