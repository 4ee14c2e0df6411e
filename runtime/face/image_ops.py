"""Image operations of the face path in torch, on whatever device the photo tensor is on (CPU or CUDA).

The photo is uploaded once as a uint8 tensor; each step reproduces the OpenCV call insightface makes
(tests/face_reference.py keeps the numpy/OpenCV versions; tests/test_face_device.py compares them):

    resize_tensor        = cv2.resize INTER_LINEAR (uint8: OpenCV's fixed point, bit for bit)
    letterbox_tensor     = insightface's SCRFD letterbox (that resize, top-left, zero pad)
    blob_tensor          = cv2.dnn.blobFromImages ((x - mean) / std, optional BGR<->RGB swap, NCHW)
    warp_affine_tensor   = cv2.warpAffine(..., borderValue=0) (bilinear, pixel centres at integers)
    norm_crop_tensor     = insightface.utils.face_align.norm_crop

Images are (N, 3, H, W) tensors; uint8 in -> uint8 out, float in -> float out. The uint8 resize (and
so the detector's canvas) equals OpenCV's bit for bit; the warp is within 1 grey level (float
bilinear rounded half up against OpenCV's fixed-point remap).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runtime.face.align import estimate_norm


def to_device_image(image: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 array (channel order kept) -> (1, 3, H, W) uint8 tensor on `device`.

    Uploads the uint8 pixels (a quarter of the float32 bytes) and permutes on the device.
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"to_device_image takes an (H, W, 3) uint8 array, got {got}: load it with "
                         "runtime.images.load_image")
    # read-only arrays (e.g. decoded images) are copied once: torch.from_numpy warns on them
    return torch.from_numpy(np.require(image, requirements=("C", "W"))).to(device).permute(2, 0, 1)[None]


def _like(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float result -> `dtype`; uint8 rounds half up and saturates, as OpenCV's fixed point does."""
    if dtype == torch.uint8:
        return (result + 0.5).floor_().clamp_(0, 255).to(torch.uint8)
    return result.to(dtype)


def _linear_taps(dst: int, src: int, clamp: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """OpenCV's INTER_LINEAR taps along one axis: (i0, i1, w0, w1), each (dst,), weights in 1/2048.

    As resize.cpp computes them: fx = float32((d + 0.5)·scale − 0.5) with scale = 1 / (dst / src) in
    double, sx = floor(fx), weights cvRound((1 − fx)·2048) and cvRound(fx·2048), each rounded on its
    own. Along x (clamp=True) taps off the image are pinned to the edge pixel with fx = 0; along y
    OpenCV keeps fx and clips the row indices instead.
    """
    scale = 1.0 / (dst / src)
    fx = ((torch.arange(dst, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).float()
    sx = fx.floor()
    fx = fx - sx
    sx = sx.long()
    if clamp:
        low, high = sx < 0, sx >= src - 1
        fx = torch.where(low | high, torch.zeros_like(fx), fx)
        sx = torch.where(low, torch.zeros_like(sx), torch.where(high, torch.full_like(sx, src - 1), sx))
    w0 = ((1.0 - fx) * 2048.0).round().long()  # round half to even, as cvRound
    w1 = (fx * 2048.0).round().long()
    return sx.clamp(0, src - 1), (sx + 1).clamp(0, src - 1), w0, w1


def _resize_uint8(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """cv2.resize INTER_LINEAR on uint8, bit for bit: 11-bit fixed-point taps, rows summed in int32, the
    vertical pass as OpenCV's SIMD kernel (VResizeLinearVec_32s8u: (S >> 4)·β >> 16 per row, then
    (sum + 2) >> 2). An exact 2x shrink takes OpenCV's INTER_AREA shortcut (2×2 mean, rounded)."""
    h, w = image.shape[-2:]
    if w == 2 * width and h == 2 * height:
        pixels = image.long()
        total = pixels[..., 0::2, 0::2] + pixels[..., 0::2, 1::2] + pixels[..., 1::2, 0::2] + pixels[..., 1::2, 1::2]
        return ((total + 2) >> 2).to(torch.uint8)
    x0, x1, a0, a1 = _linear_taps(width, w, True, image.device)
    y0, y1, b0, b1 = _linear_taps(height, h, False, image.device)
    pixels = image.long()
    rows = pixels[..., x0] * a0 + pixels[..., x1] * a1  # (N, C, h, width), scaled by 2048
    top, bottom = rows[..., y0, :] >> 4, rows[..., y1, :] >> 4
    total = ((top * b0[:, None]) >> 16) + ((bottom * b1[:, None]) >> 16)
    return ((total + 2) >> 2).clamp(0, 255).to(torch.uint8)


def resize_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv2.resize(image, (width, height)) with INTER_LINEAR: (N, C, H, W) -> (N, C, height, width).

    uint8: OpenCV's fixed-point arithmetic reproduced exactly (`_resize_uint8`). Float: bilinear with
    half-pixel centres and no antialiasing when shrinking, as OpenCV's float path.
    """
    width, height = size
    if tuple(image.shape[-2:]) == (height, width):
        return image.clone()
    if image.dtype == torch.uint8:
        return _resize_uint8(image, width, height)
    resized = F.interpolate(image.float(), size=(height, width), mode="bilinear", align_corners=False,
                            antialias=False)
    return resized.to(image.dtype)


def letterbox_tensor(image: torch.Tensor, size: tuple[int, int], upscale: bool = True) -> tuple[torch.Tensor, float]:
    """insightface's SCRFD letterbox on a tensor: fit (N, 3, H, W) top-left into a zero canvas of size (width, height).

    Same scaled size (the limiting side set to the canvas side, the other int-truncated), same
    bilinear resize (`resize_tensor`), zero padding; upscale=False only pads an image that already fits.
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
    """insightface's norm_crop on the device: ArcFace-aligned crops (N, 3, S, S) of one image (1, 3, H, W).

    kps: N landmark sets (5, 2) on the host. The 5-point Umeyama fit stays on the host in
    float64 (`estimate_norm`): a 2×2 SVD is cheaper there than a device launch, and the kps
    come to the host anyway (they draw the kps image); only the warp runs on the device.
    """
    matrices = np.stack([estimate_norm(points, image_size) for points in kps])
    return warp_affine_tensor(image, matrices, (image_size, image_size))
