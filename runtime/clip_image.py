"""CLIP image preprocessing for the image encoder, equal to transformers' CLIPImageProcessor defaults.

Shortest edge to 224 (PIL bicubic), centre crop 224, x/255, normalise with CLIP's mean/std, NCHW.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_pixel_values(rgb: np.ndarray, size: int = 224) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> pixel values (1, 3, size, size) float32."""
    height, width = rgb.shape[:2]
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float32)
    pixels = (crop * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)
