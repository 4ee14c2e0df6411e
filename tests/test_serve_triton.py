"""docs/triton/instantid/1/model.py (Triton Python backend) over the tiny build, with a stand-in for
`triton_python_backend_utils` (Triton itself is not installable here): tensors in, images out,
bad requests answered with INVALID_ARG while the rest of the batch succeeds."""
from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from serve_helpers import reused_build

MODEL_PY = Path(__file__).resolve().parents[1] / "docs" / "triton" / "instantid" / "1" / "model.py"

pytestmark = pytest.mark.slow


def stub_pb_utils() -> types.ModuleType:
    """The few names of triton_python_backend_utils that model.py uses."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, np.asarray(array)

        def as_numpy(self):
            return self.array

    class TritonError(Exception):
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code="INTERNAL"):
            super().__init__(message)
            self.code = code

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    class InferenceRequest:
        def __init__(self, tensors):
            self.tensors = {t.name: t for t in tensors}

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = (Tensor, TritonError, InferenceResponse,
                                                                          InferenceRequest)
    pb.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    return pb


def request(pb, photo: bytes, **values):
    kinds = {"STEPS": np.int32, "WIDTH": np.int32, "HEIGHT": np.int32, "SEED": np.int64, "IP_SCALE": np.float32}
    tensors = [pb.Tensor("IMAGE", np.array([[photo]], dtype=object))]
    for name, value in values.items():
        dtype = object if isinstance(value, bytes) else kinds[name]
        tensors.append(pb.Tensor(name, np.array([[value]], dtype=dtype)))
    return pb.InferenceRequest(tensors)


@pytest.fixture(scope="module")
def serve_build(request) -> Path:
    """The tiny ONNX build: $INSTANTRT_TINY_BUILD, else the session's shared export (fixtures_tiny.py)."""
    return reused_build() or request.getfixturevalue("tiny_onnx_fp32")


def test_triton_model_py_generates_and_refuses_bad_requests(serve_build, monkeypatch):
    build = serve_build
    pb = stub_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("triton_instantid_model", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    parameters = {"build_dir": str(build), "backend": "onnxruntime", "pipeline": "ip-adapter", "max_side": "512"}
    model.initialize({"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in
                                                                  parameters.items()}}),
                      "model_instance_device_id": "0"})
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, "JPEG")
    photo = buffer.getvalue()
    good = request(pb, photo, PROMPT=b"a cat", STEPS=2, WIDTH=128, HEIGHT=192, SEED=3)
    negative_steps = request(pb, photo, PROMPT=b"a cat", STEPS=-1)
    corrupt = request(pb, b"not an image", PROMPT=b"a cat")
    responses = model.execute([good, negative_steps, corrupt])
    images = responses[0].output_tensors[0].as_numpy()
    assert responses[0].error is None and images.shape == (1, 192, 128, 3) and images.dtype == np.uint8
    assert responses[1].error.code == "INVALID_ARG" and "steps" in str(responses[1].error)
    assert responses[2].error.code == "INVALID_ARG" and "not an image" in str(responses[2].error)
    model.finalize()
