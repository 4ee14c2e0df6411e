"""export.onnx_export.save_model with file-backed attribute tensors (what tracing a > 2 GB model
leaves behind): the saved model must not point into the trace's temporary folder."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import onnx_export


def _traced_like(folder, mask: np.ndarray, weight: np.ndarray):
    """y = (x + Constant(mask)) @ W, saved as the exporter's tracer saves big models: every tensor,
    the Constant's attribute included, in its own file beside the model."""
    constant = helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(mask, "mask"))
    graph = helper.make_graph(
        [constant, helper.make_node("Add", ["x", "mask"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])],
        "traced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "traced.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0,
                    convert_attribute=True)
    assert len(list(folder.iterdir())) == 3  # model + the Constant's file + W's file
    return path


@pytest.mark.parametrize("external", [True, False], ids=["external-data", "inline"])
def test_attribute_tensors_survive_the_trace_folder(tmp_path, monkeypatch, external):
    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    rng = np.random.default_rng(0)
    mask = rng.standard_normal((4, 256)).astype(np.float32)
    weight = rng.standard_normal((256, 8)).astype(np.float32)
    trace = tmp_path / "trace"
    trace.mkdir()
    model = ir.load(_traced_like(trace, mask, weight))

    out = tmp_path / "onnx" / "component.onnx"
    out.parent.mkdir()
    onnx_export.save_model(model, out)
    shutil.rmtree(trace)  # the exporter's temporary folder is gone after the export

    files = sorted(p.name for p in out.parent.iterdir())
    assert files == (["component.onnx", "component.onnx.data"] if external else ["component.onnx"])
    onnx.checker.check_model(str(out), full_check=True)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], (x + mask) @ weight, rtol=1e-5, atol=1e-4)
