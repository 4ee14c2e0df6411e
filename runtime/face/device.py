"""Face analysis pre/post-processing in torch, on whatever device the photo tensor is on.

The host path (`detect.py`, `align.py`, `analyzer.py`) runs numpy + OpenCV around the models;
this is the same arithmetic for a photo uploaded once as a uint8 tensor (CPU or CUDA, one code):

    letterbox_tensor     = detect.letterbox (cv2.resize INTER_LINEAR: bilinear, no antialias)
    blob_tensor          = cv2.dnn.blobFromImages ((x - mean) / std, optional BGR<->RGB swap, NCHW)
    warp_affine_tensor   = cv2.warpAffine(..., borderValue=0) (bilinear, pixel centres at integers)
    norm_crop_tensor     = align.norm_crop
    scrfd_faces / yunet_faces = the detectors' decoding, score threshold and NMS

Images are (N, 3, H, W) tensors; uint8 in -> uint8 out (rounded half up, as OpenCV's fixed
point), float in -> float out. Outputs match OpenCV to within 1 grey level (tests/test_face_device.py).

Host syncs per photo: one after the score threshold (the number of candidates sets the NMS
size) and one to fetch the kept faces' boxes/kps/scores, which the Umeyama fit, the kps image
and `Face` need on the host anyway. NMS itself runs on the device without syncing.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runtime.face.align import estimate_norm
from runtime.face.detect import STRIDES, Face


def to_device_image(image: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 array (channel order kept) -> (1, 3, H, W) uint8 tensor on `device`.

    Uploads the uint8 pixels (a quarter of the float32 bytes) and permutes on the device.
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"to_device_image takes an (H, W, 3) uint8 array, got {got}: load it with "
                         "runtime.images.load_image")
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None]


def _like(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float result -> `dtype`; uint8 rounds half up and saturates, as OpenCV's fixed point does."""
    if dtype == torch.uint8:
        return (result + 0.5).floor_().clamp_(0, 255).to(torch.uint8)
    return result.to(dtype)


def resize_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv2.resize(image, (width, height)) with INTER_LINEAR: (N, C, H, W) -> (N, C, height, width).

    Half-pixel centres and no antialiasing when shrinking, exactly as OpenCV's bilinear.
    """
    width, height = size
    if tuple(image.shape[-2:]) == (height, width):
        return image.clone()
    resized = F.interpolate(image.float(), size=(height, width), mode="bilinear", align_corners=False,
                            antialias=False)
    return _like(resized, image.dtype)


def letterbox_tensor(image: torch.Tensor, size: tuple[int, int], upscale: bool = True) -> tuple[torch.Tensor, float]:
    """detect.letterbox on a tensor: fit (N, 3, H, W) top-left into a zero canvas of size (width, height).

    Same scaled size (the limiting side set to the canvas side, the other int-truncated), same
    bilinear resize, zero padding; upscale=False only pads an image that already fits.
    Returns (canvas (N, 3, height, width) of the image's dtype, scale) with canvas pixel = scale × image pixel.
    """
    width, height = size
    h, w = image.shape[-2:]
    canvas = image.new_zeros((*image.shape[:-2], height, width))
    if not upscale and h <= height and w <= width:
        canvas[..., :h, :w] = image
        return canvas, 1.0
    if h / w > height / width:
        new_h, new_w = height, int(height / (h / w))
    else:
        new_w, new_h = width, int(width * (h / w))
    canvas[..., :new_h, :new_w] = resize_tensor(image, (new_w, new_h))
    return canvas, new_h / h


def blob_tensor(images: torch.Tensor, mean: float, std: float, swap_rb: bool) -> torch.Tensor:
    """cv2.dnn.blobFromImages(images, 1/std, mean=mean, swapRB=swap_rb) on the device.

    images: (N, 3, H, W) uint8 or float. Returns (N, 3, H, W) float32 (x − mean) · (1/std), channels
    reversed when swap_rb (BGR -> RGB). SCRFD: (127.5, 128, True); glintr100: (127.5, 127.5, True).
    """
    blob = images.float()
    if swap_rb:
        blob = blob.flip(1)
    return (blob - mean) * (1.0 / std)


def _pixel_to_normalized(width: int, height: int) -> np.ndarray:
    """(3, 3) map from pixel coordinates (centres at integers) to grid_sample's [-1, 1] (align_corners=False)."""
    return np.array([[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0, 0, 1]])


def warp_affine_tensor(image: torch.Tensor, matrices, size: tuple[int, int]) -> torch.Tensor:
    """cv2.warpAffine(image, M, size, borderValue=0) for each M, on the device.

    image: (1, C, H, W) (or (N, C, H, W), one image per matrix). matrices: (2, 3) or (N, 2, 3)
    forward maps (image pixels -> output pixels), numpy or host tensor. size: (width, height).
    Returns (N, C, height, width) of the image's dtype; bilinear, zero outside the image.
    The matrices are inverted and normalised on the host in float64 (a few scalars); the
    sampling is one grid_sample on the device.
    """
    width, height = size
    forward = np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3)
    full = np.tile(np.eye(3), (len(forward), 1, 1))
    full[:, :2] = forward
    # grid_sample reads the source at theta @ (output grid): theta = N_src · M⁻¹ · N_out⁻¹.
    theta = _pixel_to_normalized(image.shape[-1], image.shape[-2]) @ np.linalg.inv(full) @ np.linalg.inv(
        _pixel_to_normalized(width, height))
    theta = torch.from_numpy(theta[:, :2].astype(np.float32)).to(image.device)
    count = len(forward)
    grid = F.affine_grid(theta, [count, image.shape[1], height, width], align_corners=False)
    source = image.float()
    if source.shape[0] != count:
        source = source.expand(count, -1, -1, -1)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _like(warped, image.dtype)


def norm_crop_tensor(image: torch.Tensor, kps: Sequence[np.ndarray], image_size: int = 112) -> torch.Tensor:
    """align.norm_crop on the device: ArcFace-aligned crops (N, 3, S, S) of one image (1, 3, H, W).

    kps: N landmark sets (5, 2) on the host. The 5-point Umeyama fit stays on the host in
    float64 (`estimate_norm`): a 2×2 SVD is cheaper there than a device launch, and the kps
    come to the host anyway (they draw the kps image); only the warp runs on the device.
    """
    matrices = np.stack([estimate_norm(points, image_size) for points in kps])
    return warp_affine_tensor(image, matrices, (image_size, image_size))


# ---- detector decoding ---------------------------------------------------------------------------

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
    """SCRFDDetector.detect's decoding on the device: raw outputs -> Faces in image pixels, best first.

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
    """YuNetDetector.detect's decoding (cv2.FaceDetectorYN's) on the device -> Faces in image pixels.

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
