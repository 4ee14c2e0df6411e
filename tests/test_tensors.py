"""engine.tensors: the dtype map against the real onnx, onnx_ir, ONNX Runtime, torch and TensorRT-RTX
names; TensorSpec equality and manifest JSON (old manifests included); the ONNX I/O reader."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch

from engine.manifest import ManifestError, load_manifest, manifest_from_dict, manifest_to_dict
from engine.tensors import (DTYPES, TensorSpec, dtype_name, onnx_dtype, onnx_enum, onnx_io, ort_dtype, spec_from_dict,
                            torch_dtype, trt_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_every_vocabulary_names_the_same_type(dtype):
    import onnx_ir as ir

    assert oh.tensor_dtype_to_np_dtype(dtype.onnx).name == dtype.name  # numpy's (ml_dtypes') name of the ONNX type
    assert ir.DataType(dtype.onnx).name == onnx.TensorProto.DataType.Name(dtype.onnx)
    assert onnx_dtype(onnx_enum(dtype.name)) == ort_dtype(dtype.ort) == dtype.name
    assert dtype_name(torch_dtype(dtype.name)) == dtype.name


def test_ort_type_strings_are_onnxruntimes(tmp_path):
    """The strings ONNX Runtime reports for float, double, float16 and int64 graph inputs."""
    import onnxruntime as ort

    names = {"a": onnx.TensorProto.FLOAT, "b": onnx.TensorProto.DOUBLE, "c": onnx.TensorProto.FLOAT16,
             "d": onnx.TensorProto.INT64, "e": onnx.TensorProto.BOOL}
    graph = oh.make_graph([oh.make_node("Identity", [n], [f"{n}_out"]) for n in names], "ids",
                          [oh.make_tensor_value_info(n, t, [2]) for n, t in names.items()],
                          [oh.make_tensor_value_info(f"{n}_out", t, [2]) for n, t in names.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [ort_dtype(i.type) for i in session.get_inputs()] == ["float32", "float64", "float16", "int64", "bool"]


def test_trt_names_are_tensorrts():
    trt = pytest.importorskip("tensorrt_rtx")
    members = [d for d in DTYPES if d.trt]
    assert all(trt_dtype(getattr(trt.DataType, d.trt)) == d.name for d in members)
    assert trt_dtype(trt.DataType.FP4) == "fp4"  # not in the map: TensorRT's own name, lower-cased


def test_unknown_types_say_so():
    with pytest.raises(TypeError, match="unknown element type 'complex64'"):
        torch_dtype("complex64")
    with pytest.raises(TypeError, match=r"tensor\(string\) is none the runtime feeds"):
        ort_dtype("tensor(string)")


def test_specs_compare_across_dtype_vocabularies():
    named = TensorSpec("sample", "float16", ("2B", 4, "latent_height", "latent_width"))
    typed = TensorSpec("sample", torch.float16, ("2B", 4, "latent_height", "latent_width"))
    assert named == typed and hash(named) == hash(typed) and typed.dtype_name == "float16"
    assert named.torch_dtype is torch.float16
    assert named != TensorSpec("sample", "float32", named.shape)
    assert named != TensorSpec("sample", "float16", named.shape, min=(2, 4, 8, 8), max=(8, 4, 16, 16))


def _manifest_dict(engine_outputs: list[dict]) -> dict:
    return {"schema_version": 1, "model": "tiny", "metadata": {}, "components": {"vae_decoder": {
        "onnx": {"path": "onnx/vae_decoder.onnx", "sha256": "ab" * 32, "size_bytes": 10, "params": 3, "opset": 17,
                 "inputs": [{"name": "latents", "dtype": "float32", "shape": ["batch", 4, "latent_height", 8]}],
                 "outputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", 64]}]},
        "engine": {"path": "engines/vae_decoder.plan", "onnx_sha256": "ab" * 32, "backend": "tensorrt-rtx",
                   "backend_version": "1.7.1", "compute_capabilities": ["sm89"], "build_device": "cpu",
                   "flags": {"opt_level": 3, "workspace_gb": None, "refittable": False, "strip_plan": False},
                   "profiles": [{"latents": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 16, 8]}}],
                   "inputs": [{"name": "latents", "dtype": "float32", "shape": ["batch", 4, "latent_height", 8],
                               "min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 16, 8]}],
                   "outputs": engine_outputs, "build_seconds": 1.5, "plan_bytes": 100, "plan_sha256": "cd" * 32,
                   "built_at": "2026-01-01T00:00:00+00:00"}}}}


def test_manifest_json_keeps_reading_older_manifests():
    """Manifests written before engine.tensors (null min/opt/max on outputs) read the same as new ones,
    which leave an unknown range out; the format stays schema 1."""
    old = _manifest_dict([{"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", 64],
                           "min": None, "opt": None, "max": None}])
    manifest = manifest_from_dict(old)
    engine = manifest.components["vae_decoder"].engine
    assert engine.outputs == (TensorSpec("image", "float32", ("batch", 3, "height", 64)),)
    assert engine.inputs[0].max == (2, 4, 16, 8)
    written = manifest_to_dict(manifest)
    component = written["components"]["vae_decoder"]
    image = {"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", 64]}
    assert component["engine"]["outputs"] == [image]
    assert component["engine"]["inputs"][0]["opt"] == [1, 4, 8, 8]
    assert component["onnx"]["inputs"] == old["components"]["vae_decoder"]["onnx"]["inputs"]
    assert manifest_from_dict(json.loads(json.dumps(written))) == manifest


def test_a_torch_dtype_in_a_manifest_is_written_by_name():
    manifest = manifest_from_dict(_manifest_dict([]))
    manifest.components["vae_decoder"].onnx.outputs = (TensorSpec("image", torch.float16, ("batch", 3, "height", 64)),)
    assert manifest_to_dict(manifest)["components"]["vae_decoder"]["onnx"]["outputs"][0]["dtype"] == "float16"


def test_another_schema_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({**_manifest_dict([]), "schema_version": 2}))
    with pytest.raises(ManifestError, match="schema 2 is not 1; rebuild the directory"):
        load_manifest(tmp_path)


def test_onnx_io_reads_names_dtypes_axis_names_and_external_data(tmp_path):
    weight = np.ones((4, 2), np.float16)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"]), oh.make_node("Shape", ["x"], ["rows"])], "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["batch", 4]),
         oh.make_tensor_value_info("w", onnx.TensorProto.FLOAT16, [4, 2])],  # an initializer listed as input
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["batch", 2]),
         oh.make_tensor_value_info("rows", onnx.TensorProto.INT64, [None])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, path, save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    io = onnx_io(path)
    assert io.inputs == (TensorSpec("x", "float16", ("batch", 4)),)
    assert io.outputs == (TensorSpec("y", "float16", ("batch", 2)), TensorSpec("rows", "int64", ("",)))
    assert io.external_data == ("g.onnx.data",)
    assert onnx_io(onnx.load(str(path), load_external_data=False)) == io
    assert spec_from_dict({"name": "x", "dtype": "float16", "shape": ["batch", 4]}) == io.inputs[0]
